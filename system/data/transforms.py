"""Image batches -> tensors: the eval transform comes from timm, the SSL views from torchvision.

Used by Ray Data `map_batches` (training input and batch inference) and by the Serve
embedder, so the same bytes give the same tensor everywhere.

    .venv/bin/python -m pytest -q tests/test_data.py -k "threaded_decoding or reproducible_on_the_seed"
"""

from __future__ import annotations

import functools
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from system.data.dataset import decode_image

if TYPE_CHECKING:
    import torch

# torch, timm and torchvision are imported inside the functions that use them. Ray Data
# pipelines name `preprocess_batch`, so every process that unpickles one imports this
# module: the Ray Train controller and the split coordinator, which never transform an
# image. Importing torch + timm there cost 4-5 s per process on 2 CPUs (see
# system/train_callbacks.py).


def preprocessing_config(model: torch.nn.Module, image_size: int | None = None) -> dict:
    """The model's preprocessing as a plain dict, from timm's data config.

    An explicit `image_size` (small images such as CIFAR-10 or digits) also drops the
    centre crop: cropping a 32x32 image loses too much of it.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = int(image_size or cfg["input_size"][-1])
    return {
        "size": size,
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": cfg["interpolation"],
        "crop_pct": 1.0 if image_size else float(cfg.get("crop_pct", 1.0)),
    }


def eval_transform(pre: dict):
    from timm.data import create_transform

    return create_transform(
        input_size=(3, pre["size"], pre["size"]),
        is_training=False,
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        interpolation=pre["interpolation"],
        crop_pct=pre["crop_pct"],
    )


def ssl_view_transform(pre: dict, hflip: bool = True):
    """SimCLR-style augmentation, scaled down for small images (no blur below 64 px)."""
    import torch
    from torchvision.transforms import v2

    steps = [
        v2.RandomResizedCrop(pre["size"], scale=(0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(p=0.5 if hflip else 0.0),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if pre["size"] >= 64:
        steps.append(v2.RandomApply([v2.GaussianBlur(9)], p=0.5))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre["mean"], pre["std"])]
    return v2.Compose(steps)


def images_to_tensor(images, transform, threads: int = 1) -> np.ndarray:
    """Encoded image bytes -> float32 array [N, 3, H, W], decoded on `threads` threads.

    PIL's decoder and resampler and torch's ops release the GIL, so threads scale with the
    CPUs a process has. That matters on GPUs: one CPU thread decodes about 200 photo-sized
    JPEGs/s, where the GPU embeds 12,000 (benchmarks/bench_gpu.py). Random transforms
    (SSL views) stay on one thread so their random draws keep a fixed order.
    """
    threads = min(threads, len(images))
    if threads <= 1:
        arrays = [transform(decode_image(data)).numpy() for data in images]
    else:
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(lambda data: transform(decode_image(data)).numpy(), images))
    return np.stack(arrays).astype(np.float32)


def decode_threads() -> int:
    """Threads for decoding in this process: torch's count, which Ray sets to the CPUs that a
    task or actor reserved (so a replica given 8 CPUs decodes on 8 threads, one given 1 on 1)."""
    import torch

    return torch.get_num_threads()


@functools.lru_cache(maxsize=8)
def _cached_transform(pre_json: str, mode: str, hflip: bool):
    pre = json.loads(pre_json)
    return ssl_view_transform(pre, hflip) if mode == "ssl" else eval_transform(pre)


def preprocess_batch(
    batch: dict,
    pre: dict,
    mode: str = "eval",
    keep: tuple[str, ...] = ("label",),
    hflip: bool = True,
    seed: int | None = None,
) -> dict:
    """For Ray Data `map_batches` (as tasks): decode and transform a batch of rows.

    mode "eval" -> column `image`; mode "ssl" -> two augmented views `view1`, `view2`
    (`hflip` false: no horizontal flips). Columns listed in `keep` pass through unchanged.
    With a `seed`, the views' random draws are seeded by it and the batch's ids, in order:
    the same batch gives the same views in every run, and since a seeded global shuffle
    makes other batches each epoch, each epoch still sees new views.
    """
    import torch

    transform = _cached_transform(json.dumps(pre, sort_keys=True), mode, hflip)
    out = {k: batch[k] for k in keep if k in batch}
    if mode != "ssl":
        out["image"] = images_to_tensor(batch["image"], transform)
        return out
    with torch.random.fork_rng(devices=[]):  # the task's own generator is left as it was
        if seed is not None:
            rows = batch["id"] if "id" in batch else batch["image"]
            torch.manual_seed(zlib.crc32("\n".join(map(str, rows)).encode(), seed))
        out["view1"] = images_to_tensor(batch["image"], transform)
        out["view2"] = images_to_tensor(batch["image"], transform)
    return out
