"""FAISS on the CPU vs the GPU for one `--factory auto` candidate: build time, search rate, recall@10.

    python benchmarks/gpu_suite.py --only faiss     # runs faiss_case for every auto candidate

Data: unit vectors around 1,000 random centres (inner product, as `repforge index build`
indexes normalised embeddings); queries are other points of the same mixture. Recall@10 is
against an exact Flat search of the same queries.
- CPU: the recipe's index trained (k-means on the CPU) and filled on all CPU threads;
- GPU build: the same index trained by system.index.build.train_index, which runs k-means on
  the GPUs when FAISS sees any (what `repforge index build` does), then filled on the CPU;
- GPU search: the CPU-built index moved with index_cpu_to_gpu, where FAISS has a GPU index of
  its kind (Flat, IVF-SQ8; not fast-scan PQ, RaBitQ, Refine or HNSW, whose GPU counterpart
  CAGRA needs a cuVS build). Search parameters: nprobe 32 (IVF), efSearch 64 (HNSW), 4k re-ranked (Refine).
"""

from __future__ import annotations

import time

import faiss
import numpy as np


def mixture(count: int, dim: int, seed: int, centres: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).standard_normal((centres, dim)).astype(np.float32)
    x = means[rng.integers(0, centres, count)] + 0.3 * rng.standard_normal((count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def inner(index):
    """The index inside new_index's id map (ids are row positions here)."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def timed_search(index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    index.search(queries[:16], k)  # warm-up
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return len(queries) / (time.perf_counter() - start), ids


def faiss_case(candidate: str, count: int, dim: int, queries: int, gpus: int) -> tuple:
    """One RESULTS.md row (setup, GPU, CPU, ratios): auto `candidate` on `count` x `dim`."""
    from system.index.auto import estimate
    from system.index.build import train_index, train_sample_size
    from system.index.recipes import new_index

    string = estimate(candidate, count, dim)[0]
    base, query = mixture(count, dim, 1), mixture(queries, dim, 2)
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    _, truth = exact.search(query, 10)
    params = "nprobe=32" if "IVF" in string else "efSearch=64" if "HNSW" in string else ""
    params += ",k_factor_rf=4" if "Refine" in string else ""  # re-rank 4k candidates

    def build(on_gpu: bool) -> tuple[object, float]:
        index = new_index(dim, string, "ip")  # as `repforge index build` makes it
        sample = base[: train_sample_size(index, count)]
        start = time.perf_counter()
        if on_gpu:
            train_index(index, sample, string)  # k-means on the GPUs
        elif not index.is_trained:
            index.train(sample)
        index.add_with_ids(base, np.arange(count))
        if params:
            faiss.ParameterSpace().set_index_parameters(inner(index), params)
        return index, time.perf_counter() - start

    cpu_index, cpu_build = build(False)
    cpu_qps, cpu_ids = timed_search(cpu_index, query, 10)
    cpu = f"CPU: build {cpu_build:.1f} s, {cpu_qps:.0f} queries/s, recall@10 {recall(cpu_ids, truth):.3f}"
    setup = f"faiss auto candidate {candidate} ({string}), {count} x {dim} clustered, inner product"
    setup += f", {queries} queries"
    if not gpus:
        return setup, "GPU: not measured (FAISS sees no GPU)", cpu, "-"
    # Only IVF recipes have a GPU step in their build (k-means); the others are built once.
    gpu_index, gpu_build = build(True) if "IVF" in string else (cpu_index, cpu_build)
    gpu = [f"GPU: build {gpu_build:.1f} s{' (k-means on the GPU)' if 'IVF' in string else ' (no GPU step)'}"]
    ratios = [f"build x{cpu_build / gpu_build:.2f}"]
    try:
        resources = faiss.StandardGpuResources()
        cpu_side = inner(gpu_index)  # ids are positions: the id map is not needed on the GPU
        ivf = faiss.try_extract_index_ivf(cpu_side)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # GPU IVF indexes keep none
        on_gpu = faiss.index_cpu_to_gpu(resources, 0, cpu_side)
        if "IVF" in string:
            faiss.GpuParameterSpace().set_index_parameters(on_gpu, params)
        gpu_qps, gpu_ids = timed_search(on_gpu, query, 10)
        gpu.append(f"{gpu_qps:.0f} queries/s on the GPU, recall@10 {recall(gpu_ids, truth):.3f}")
        ratios.append(f"search x{gpu_qps / cpu_qps:.1f}")
    except (RuntimeError, AttributeError) as err:
        gpu.append(f"search stays on the CPU (no GPU index for it: {str(err).splitlines()[0][:80]})")
    return setup, ", ".join(gpu), cpu, "; ".join(ratios)
