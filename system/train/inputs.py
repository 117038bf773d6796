"""The Ray Data input pipeline of a training run: cached encoded rows, shuffle, decode and augment as tasks.

.venv/bin/python -m pytest -q tests/test_data.py -k input
"""

from __future__ import annotations

import ray

from system import storage
from system.config import JobConfig
from system.data.dataset import balance_rows, class_repeats, read_dataset, read_table, training_columns
from system.data.transforms import preprocess_batch
from system.objectives.registry import get_objective

MIN_BLOCK_ROWS = 512


def cached_input(uri: str, limit: int | None, cache_mb: float):
    """The encoded rows of a dataset: held in Ray's object store when they are small.

    Each epoch runs the Ray Data pipeline again, and on a 2-CPU machine reading the Parquet
    files again cost 1.2-2 s per epoch, while one pass over the same rows (1,438 digits) held
    in the object store took 0.13 s, shuffle and map included. A small dataset is read here,
    in the driver, not by Ray Data read tasks: starting their worker processes took 7 s on
    2 CPUs for a 116 KB dataset. Decoding and augmentation still run every epoch, after the
    cache: each epoch sees new augmentations.
    """
    store_bytes = ray.cluster_resources().get("object_store_memory", 0)
    columns = training_columns(uri)
    if storage.parquet_bytes(uri) > min(cache_mb * 2**20, store_bytes / 4):
        return read_dataset(uri, limit, columns)
    return ray.data.from_arrow(read_table(uri, limit, columns))


def decode_options(cfg: JobConfig, job: str, pre: dict) -> dict:
    """How training rows become tensors (preprocess_batch's, or device_batch's, arguments)."""
    mode = "ssl" if job == "pretrain" and get_objective(cfg.objective.name).views == 2 else "eval"
    # With a seeded global shuffle, batches differ every epoch, so views seeded per batch do too.
    seed = cfg.seed if cfg.data.shuffle == "global" else None
    return {"pre": pre, "mode": mode, "hflip": cfg.data.hflip, "seed": seed}


def input_datasets(cfg: JobConfig, job: str, pre: dict) -> dict:
    """The Ray Data pipelines of a run: decoding and augmentation as tasks beside the workers.

    Reproducible on `seed`: the global shuffle is seeded (a new order each epoch, the same
    orders in every run) and so are the SSL views of each batch (preprocess_batch).
    """
    options = decode_options(cfg, job, pre)
    # Their progress bars would interleave with the workers' progress lines: off.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train = cached_input(cfg.data.train, cfg.data.limit, cfg.data.cache_mb)
    if cfg.data.balance:  # before the shuffle, so the repeated rows of a class spread out
        repeats = class_repeats(cfg.data.train, cfg.data.limit)
        train = train.map_batches(
            balance_rows, batch_format="pyarrow", fn_kwargs={"repeats": repeats, "seed": cfg.seed}
        )
    if cfg.data.shuffle == "global":  # datasets are often sorted by class (CIFAR-10's files are)
        # Shuffles the encoded rows, before decoding; reseeded after each epoch.
        train = train.random_shuffle(
            seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True)
        )
    # Small batches: a worker's first step waits for one batch, not for a 1,024-image block.
    batch = cfg.train.batch_size
    # Blocks of at most `rows` (streaming): a Parquet file is read as one block, and the tasks
    # that decode and augment work block by block, so without this one task does a whole
    # file's work while the other CPUs and the workers wait (a GPU worker went from 143 to
    # 3,277 img/s with 256-row blocks, benchmarks/RESULTS.md). Not much smaller: each block
    # costs a task, and 32-row blocks slowed the 2-CPU quickstart.
    rows = max(batch, MIN_BLOCK_ROWS)
    train = train.repartition(target_num_rows_per_block=rows)
    if not cfg.train.gpu_decode:  # else encoded rows, each worker decoding on its GPU (device_collate)
        train = train.map_batches(preprocess_batch, batch_size=batch, fn_kwargs=options)
    datasets = {"train": train}
    if cfg.data.val:
        val = cached_input(cfg.data.val, None, cfg.data.cache_mb).repartition(target_num_rows_per_block=rows)
        datasets["val"] = val.map_batches(
            preprocess_batch, batch_size=batch, fn_kwargs={"pre": pre, "mode": "eval"}
        )
    return datasets
