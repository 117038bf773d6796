"""Upgrading without re-indexing: what compatibility costs and what an adapter saves.

    .venv/bin/python benchmarks/bench_compat.py --dataset digits
    .venv/bin/python benchmarks/bench_compat.py --dataset cifar10 --rows 6000 --steps 400 --old-steps 150 \
        --bct-weights 0.3 1

Three supervised test_resnet models, trained in-process with the module a Train worker
builds (system.train.module.build_model): old (seed 0, fewer steps: the weaker model an
upgrade replaces), new (seed 1, unconstrained) and new with `objective.compatible_with`
old (BCT). Top-1 retrieval of the held-out queries against the training gallery, for
old/old, new/new and new/old: without compatibility, with the BCT loss, and through each
adapter kind fitted on the gallery's paired embeddings (system.compat.maps). What
compatible training gives up is new/new against the unconstrained model's.

Then the time an adapter takes (embedding a 10,000-image sample with both models at the
measured Ray Data rate, plus the fit) against re-embedding a 1B-image gallery at that
rate: the wait an adapter removes. Rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CIFAR10, append_row  # noqa: E402

from system import storage  # noqa: E402
from system.compat import KINDS, apply_map, fit_adapter, fit_map, pair_scores  # noqa: E402
from system.compat.fit import Embedded  # noqa: E402
from system.config import load_config  # noqa: E402
from system.data.transforms import eval_transform, images_to_tensor, preprocessing_config  # noqa: E402
from system.embed.batch import embed_images  # noqa: E402
from system.models.artifact import Embedder, load_artifact, save_model  # noqa: E402
from system.train.module import build_model, train_mode  # noqa: E402
from system.train.optim import build_optimizer  # noqa: E402

SAMPLE = 10_000  # images an adapter fit embeds (with both models)
GALLERY = 1_000_000_000


def datasets(name: str, rows: int, work: Path) -> tuple[str, str, int]:
    """(train URI, test URI, image size): digits, or a shuffled CIFAR-10 subset (shipped sorted)."""
    if name == "digits":
        from system.data import digits_dataset

        return (*digits_dataset(str(work / "digits")), 16)
    out = []
    for split, n in (("train", rows), ("test", max(500, rows // 5))):
        table = pq.read_table(CIFAR10 / f"{split}.parquet")
        picks = np.random.default_rng(0).permutation(len(table))[:n]
        (work / split).mkdir()
        pq.write_table(table.take(picks), work / split / "part-00000.parquet")
        out.append(str(work / split))
    return out[0], out[1], 32


def load_images(uri: str, pre: dict) -> tuple[torch.Tensor, torch.Tensor, list[bytes], list[str]]:
    table = pq.read_table(storage.parquet_files(uri))
    raw = table.column("image").to_pylist()
    images = torch.from_numpy(images_to_tensor(raw, eval_transform(pre), 2))
    return images, torch.tensor(table.column("label").to_pylist()), raw, table.column("id").to_pylist()


def train(uri: str, train_uri: str, size: int, seed: int, steps: int, overrides=()) -> float:
    cfg = load_config(
        None,
        [
            f"data.train={train_uri}",
            f"data.image_size={size}",
            "model.name=test_resnet",
            "objective.name=supervised",
            "train.lr=0.005",
            f"seed={seed}",
            *overrides,
        ],
    )
    start = time.perf_counter()
    torch.manual_seed(seed)
    module = build_model(cfg, "pretrain", 10)
    pre = preprocessing_config(module.backbone, size)
    images, labels, _, _ = load_images(train_uri, pre)
    optimizer, generator = build_optimizer(module, cfg.train), torch.Generator().manual_seed(seed)
    train_mode(module)
    for _ in range(steps):
        rows = torch.randint(0, len(labels), (64,), generator=generator)
        loss, _ = module({"image": images[rows], "label": labels[rows]})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embedder = Embedder(module.backbone, num_classes=10)
    embedder.head.load_state_dict(module.objective.head.state_dict())
    meta = {
        "timm_name": "test_resnet",
        "timm_kwargs": {},
        "preprocessing": pre,
        "classes": list("0123456789"),
    }
    save_model(uri, embedder.eval(), meta)
    return time.perf_counter() - start


def embedded(model_uri: str, data_uri: str) -> Embedded:
    model, meta = load_artifact(model_uri)
    table = pq.read_table(storage.parquet_files(data_uri))
    with torch.inference_mode():
        vectors = embed_images(model, meta["preprocessing"], table.column("image").to_pylist())
    labels = np.asarray(table.column("label").to_pylist())
    return Embedded(table.column("id").to_pylist(), vectors, labels, meta)


def ray_data_rate(model_uri: str, data_uri: str, work: Path) -> float:
    """Images per second of `repforge embed` (Ray Data, this machine's CPUs) on the gallery."""
    import ray

    from system.embed import run_embed

    ray.init(address="local", include_dashboard=False, configure_logging=False)
    try:
        run_embed(model_uri, data_uri, str(work / "warm"), limit=256, progress_every_s=1e9)
        start = time.perf_counter()
        run_embed(model_uri, data_uri, str(work / "rate"), progress_every_s=1e9)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return len(pq.read_table(storage.parquet_files(data_uri), columns=["id"])) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--rows", type=int, default=6000, help="CIFAR-10 training rows (gallery)")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the new models")
    parser.add_argument("--old-steps", type=int, default=50, help="training steps of the old model")
    parser.add_argument(
        "--bct-weights", type=float, nargs="+", default=[1.0], help="objective.compat_weight values"
    )
    parser.add_argument("--no-rate", action="store_true", help="skip the Ray Data embedding rate")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-compat-"))
    train_uri, test_uri, size = datasets(args.dataset, args.rows, work)
    bcts = {f"bct {w:g}": w for w in args.bct_weights}
    models = {name: str(work / name.replace(" ", "-")) for name in ("old", "new", *bcts)}
    seconds = {"old": train(models["old"], train_uri, size, 0, args.old_steps)}
    seconds["new"] = train(models["new"], train_uri, size, 1, args.steps)
    for name, weight in bcts.items():
        bct = [f"objective.compatible_with={models['old']}", f"objective.compat_weight={weight}"]
        seconds[name] = train(models[name], train_uri, size, 1, args.steps, bct)
    e = {
        (m, part): embedded(models[m], uri)
        for m in models
        for part, uri in (("g", train_uri), ("q", test_uri))
    }
    old_old = pair_scores(e["old", "q"], e["old", "g"], 10)["top1"]
    rows = {}
    for name in ("new", *bcts):
        rows[name] = (
            pair_scores(e[name, "q"], e["old", "g"], 10)["top1"],
            pair_scores(e[name, "q"], e[name, "g"], 10)["top1"],
        )
    new_new = rows["new"][1]
    fit_seconds = {}
    for kind in KINDS:
        start = time.perf_counter()
        params = fit_map(kind, e["new", "g"].vectors, e["old", "g"].vectors)
        fit_seconds[kind] = time.perf_counter() - start
        mapped = apply_map(params, e["new", "q"].vectors, True)
        rows[f"adapter {kind}"] = (pair_scores(e["new", "q"], e["old", "g"], 10, mapped)["top1"], new_new)
    _, chosen = fit_adapter(
        e["new", "g"].vectors, e["old", "g"].vectors, e["new", "g"].meta, e["old", "g"].meta
    )
    n_gallery, n_queries = len(e["old", "g"].ids), len(e["old", "q"].ids)
    setup = (
        f"{args.dataset} test_resnet {size}px supervised, gallery {n_gallery} train, "
        f"{n_queries} test queries, "
        f"old {args.old_steps} steps seed 0, new {args.steps} steps seed 1; top-1 retrieval"
    )
    for name, (new_old, nn_) in rows.items():
        label = "no compatibility" if name == "new" else name
        if name in bcts:
            label = f"BCT loss (compatible_with, weight {bcts[name]:g})"
        print(f"{label:40s} old/old {old_old:.4f}  new/old {new_old:.4f}  new/new {nn_:.4f}")
        append_row(
            "bench_compat.py",
            f"{setup}: {label}",
            f"new/old {new_old:.4f} (new/new {nn_:.4f})",
            f"old/old {old_old:.4f}",
            f"new/old - old/old {new_old - old_old:+.4f}"
            + (" (passes)" if new_old >= old_old else " (fails)"),
        )
    for name, weight in bcts.items():
        cost = rows["new"][1] - rows[name][1]
        print(f"{name}: new/new given up: {cost * 100:.2f} pt (unconstrained {rows['new'][1]:.4f})")
        append_row(
            "bench_compat.py",
            f"{setup}: what BCT (weight {weight:g}) gives up on new/new",
            f"BCT new/new {rows[name][1]:.4f}",
            f"unconstrained new/new {rows['new'][1]:.4f}",
            f"{-cost * 100:+.2f} pt (goal: within 1 pt)",
        )
    if not args.no_rate:
        rate = ray_data_rate(models["new"], train_uri, work)
        fit_total = 2 * SAMPLE / rate + chosen["fit_seconds"] * SAMPLE / n_gallery
        reembed = GALLERY / rate
        print(f"embed rate {rate:.0f} img/s; adapter {fit_total:.0f} s; re-embed 1B {reembed / 3600:.0f} h")
        append_row(
            "bench_compat.py",
            f"{setup}: adapter ({chosen['kind']} chosen of {', '.join(KINDS)}) vs re-embedding 1B images, "
            f"repforge embed (Ray Data) at the measured rate; fit time scaled linearly to a {SAMPLE} sample",
            f"{fit_total:.0f} s (embed {SAMPLE} x2 models, fit {chosen['fit_seconds']:.1f} s on {n_gallery})",
            f"re-embed 1B at {rate:.0f} img/s: {reembed / 3600:.0f} h",
            f"x{reembed / fit_total:,.0f} shorter wait",
        )
    print("train seconds:", {k: round(v, 1) for k, v in seconds.items()}, "fit seconds:", fit_seconds)


if __name__ == "__main__":
    main()
