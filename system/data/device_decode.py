"""JPEG decoding and preprocessing on the model's device: nvJPEG on a GPU, the PIL path elsewhere.

    x = images_to_device(images, transform, "cuda")   # float32 [N, 3, S, S] on the GPU
    .venv/bin/python -m pytest -q tests/test_device_decode.py

One CPU thread decodes and resizes about 200 photo-sized JPEGs/s, where one H100 embeds
12,700 images/s with resnet50 (benchmarks/RESULTS.md): batch embedding and serving waited
on the CPU 97% of the time. Here a batch's JPEGs decode together on the GPU (batched nvJPEG
through `decode_jpeg(list, device="cuda")`), and timm's eval transform (resize, centre crop,
normalise) runs as tensor ops on the decoded batch, images of one shape resized together.

Rows this path cannot decode the same way as PIL take the PIL path (`images_to_tensor`),
alone: PNG, WebP, grayscale and CMYK JPEGs, 12-bit or arithmetic-coded JPEGs, files that do
not end in an EOI marker (truncated: PIL refuses them), and anything the decoder refuses.
A corrupt row thus fails as it always did, with PIL's error. Which path a batch takes:
`decode_on_device` (on when the model runs on CUDA, unless REPFORGE_GPU_DECODE=0).

The decoded pixels are libjpeg-turbo's on the CPU (identical to PIL's) and nvJPEG's on the
GPU (within a grey level or two); the resize is torchvision's antialiased tensor resize,
within 1-2 grey levels of PIL's (tests/test_device_decode.py). torchvision 0.29 deprecates
its decoders for TorchCodec's (0.16+), which are used instead when torchcodec is installed.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np

from system.data.dataset import MAX_IMAGE_PIXELS
from system.data.transforms import decode_threads, images_to_tensor

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

GPU_DECODE_ENV = "REPFORGE_GPU_DECODE"  # "0": keep the PIL path on GPUs too (embedding and serving)
# Start-of-frame markers this path decodes: baseline, extended and progressive Huffman JPEGs.
_SOF_DECODED = {0xC0, 0xC1, 0xC2}
_SOF_ANY = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_broken_devices: set[str] = set()  # devices whose decoder failed every row of a batch


def jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, bits per sample, height, width, components) from a JPEG's header; None when
    `data` is not a JPEG, its header is cut short, or its samples are marked RGB/CMYK, not YCbCr."""
    if data[:2] != b"\xff\xd8":
        return None
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_ANY:
            if i + 10 > end:
                return None
            bits, height, width, comps = (
                data[i + 4],
                int.from_bytes(data[i + 5 : i + 7], "big"),
                int.from_bytes(data[i + 7 : i + 9], "big"),
                data[i + 9],
            )
            if comps == 3 and data[i + 10 : i + 17 : 3] == b"RGB":  # component ids R, G, B: not YCbCr
                return None
            return marker, bits, height, width, comps
        if marker == 0xDA:  # scan data before a frame header: not a JPEG we read
            return None
        if marker == 0xEE and data[i + 4 : i + 9] == b"Adobe" and i + 15 < end and data[i + 15] == 0:
            return None  # Adobe's "no colour transform": RGB or CMYK samples, not YCbCr
        i += 2 + length
    return None


def device_decodable(data: bytes) -> bool:
    """Whether this path decodes `data` as PIL does: an 8-bit 3-channel (YCbCr) Huffman JPEG,
    whole (it ends in EOI), of at most MAX_IMAGE_PIXELS."""
    frame = jpeg_frame(data)
    if frame is None or data[-2:] != b"\xff\xd9":
        return False
    marker, bits, height, width, comps = frame
    return marker in _SOF_DECODED and bits == 8 and comps == 3 and 0 < height * width <= MAX_IMAGE_PIXELS


def tensor_steps(transform) -> list[tuple] | None:
    """timm's eval transform as tensor steps: ("resize", size, interpolation, max_size),
    ("crop", size), ("scale",), ("normalize", mean, std). None when it holds anything else
    (then every row takes the PIL path)."""
    steps = []
    for step in getattr(transform, "transforms", [None]):
        name = type(step).__name__
        if name == "Resize" and getattr(step, "antialias", True) in (True, None):
            size = step.size if isinstance(step.size, list | tuple) else [step.size]
            steps.append(("resize", list(size), step.interpolation, step.max_size))
        elif name == "CenterCrop":
            steps.append(("crop", list(step.size)))
        elif name in ("MaybeToTensor", "ToTensor"):
            steps.append(("scale",))
        elif name == "Normalize":
            steps.append(("normalize", [float(m) for m in step.mean], [float(s) for s in step.std]))
        else:
            return None
    return steps


def preprocess_decoded(images: list[torch.Tensor], steps: list[tuple], resize_in_float: bool) -> torch.Tensor:
    """Decoded uint8 [3, H, W] images -> the eval transform's float32 batch [N, 3, S, S].

    Images of one shape are resized together (one kernel per shape, not per image). On the
    CPU the resize runs on uint8, as PIL's does (torchvision's uint8 path is PIL's filter);
    on a GPU (`resize_in_float`) on float32, which skips a rounding to uint8.
    """
    import torch
    from torchvision.transforms.v2 import functional as F

    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for rows in groups.values():
        x = torch.stack([images[i] for i in rows])
        x = x.float() if resize_in_float else x
        unit = False  # values in 0..1 (after the transform's ToTensor), not 0..255
        for step in steps:
            if step[0] == "resize":
                x = F.resize(x, step[1], interpolation=step[2], max_size=step[3], antialias=True)
                # PIL (and the uint8 path) clamp bicubic's overshoot to 0..255.
                x = x.clamp_(0, 255) if x.is_floating_point() else x
            elif step[0] == "crop":
                x = F.center_crop(x, step[1])
            else:  # "scale" or "normalize"
                x, unit = (x if unit else x.float().div_(255)), True
                if step[0] == "normalize":
                    x = F.normalize(x, step[1], step[2])
        x = x if unit else x.float().div_(255)
        for i, row in zip(rows, x):
            out[i] = row
    return torch.stack(out) if out else torch.empty(0)


def _decoder():
    """decode_jpeg: TorchCodec's when installed (torchvision's decoders are deprecated from 0.29)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return lambda data, device: decode_jpeg(data, mode="RGB", device=device)
    except ImportError:
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(data, device):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning, message=".*TorchCodec.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

        return decode


def decode_jpegs(images: list[bytes], device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] tensors on `device`, one call for the batch; None for a row the decoder
    refused (the batch is retried row by row when one row fails it)."""
    import torch

    if not images:
        return []
    decode = _decoder()
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
    try:
        decoded = decode(encoded, device)
        return list(decoded) if isinstance(decoded, list | tuple) else [decoded]
    except Exception:  # one bad row fails the whole call: find it
        pass
    out = []
    for data in encoded:
        try:
            out.append(decode(data, device))
        except Exception:
            out.append(None)
    return out


def decode_on_device(device, gpu_decode: bool | None = None) -> bool:
    """Whether images bound for a model on `device` decode there: `gpu_decode` when given, else on
    CUDA devices unless REPFORGE_GPU_DECODE=0 (or a decoder that failed there before)."""
    if gpu_decode is not None:
        return gpu_decode
    device = str(device)
    if os.environ.get(GPU_DECODE_ENV, "1") == "0" or device in _broken_devices:
        return False
    return device.startswith("cuda")


def images_to_device(
    images: list[bytes], transform, device="cpu", threads: int = 1, gpu_decode: bool | None = None
) -> torch.Tensor:
    """Encoded images -> the eval transform's float32 [N, 3, S, S] batch on `device`.

    Decoded on the device (`decode_on_device`), with the rows it cannot decode on `threads` CPU
    threads by PIL; otherwise all on the CPU by PIL, as `images_to_tensor`. A row PIL cannot
    decode either raises PIL's error (the caller's error path, as before).
    """
    import torch

    steps = tensor_steps(transform) if decode_on_device(device, gpu_decode) else None
    if steps is None:
        return torch.from_numpy(images_to_tensor(images, transform, threads)).to(device)
    device = torch.device(device)
    on_device = [i for i, data in enumerate(images) if device_decodable(data)]
    decoded = decode_jpegs([images[i] for i in on_device], device)
    kept = [(i, d) for i, d in zip(on_device, decoded) if d is not None]
    done = {i for i, _ in kept}
    rest = [i for i in range(len(images)) if i not in done]
    parts: list[tuple[list[int], torch.Tensor]] = []
    if kept:
        batch = preprocess_decoded([d for _, d in kept], steps, resize_in_float=device.type != "cpu")
        parts.append(([i for i, _ in kept], batch))
    if rest:
        pil = images_to_tensor([images[i] for i in rest], transform, threads)
        parts.append((rest, torch.from_numpy(pil).to(device, non_blocking=True)))
        if not kept and on_device and device.type == "cuda":  # PIL read what the device refused
            _broken_devices.add(str(device))
            log.warning("JPEG decoding on %s failed a whole batch; decoding on the CPU from now on", device)
    if len(parts) == 1:
        return parts[0][1]
    order = np.argsort(np.concatenate([rows for rows, _ in parts]))
    return torch.cat([batch for _, batch in parts])[torch.as_tensor(order, device=device)]


def decode_to_uint8(images: list[bytes], device) -> list[torch.Tensor]:
    """Each image as uint8 [3, H, W] on `device`: JPEGs decoded there, the other rows by PIL."""
    import torch
    from torchvision.transforms.v2.functional import pil_to_tensor

    from system.data.dataset import decode_image

    device = torch.device(device)
    on_device = [i for i, data in enumerate(images) if device_decodable(data)]
    out: list[torch.Tensor | None] = [None] * len(images)
    for i, image in zip(on_device, decode_jpegs([images[i] for i in on_device], device)):
        out[i] = image
    for i, image in enumerate(out):
        if image is None:  # PIL's error for a corrupt row, as on the CPU path
            out[i] = pil_to_tensor(decode_image(images[i])).to(device, non_blocking=True)
    return out


def device_batch(batch: dict, pre: dict, mode: str, hflip: bool, seed: int | None, device) -> dict:
    """`preprocess_batch` on the device, for `train.gpu_decode`: the batch's encoded `image` rows
    -> `image` (eval) or `view1`/`view2` (SSL views, torchvision v2 ops on the device's uint8
    images), `label` as a tensor there. Seeded as `preprocess_batch` seeds its views."""
    import zlib

    import torch

    from system.data.transforms import _cached_transform

    out = {}
    if "label" in batch:
        out["label"] = torch.as_tensor(np.asarray(batch["label"])).to(device, non_blocking=True)
    images = list(batch["image"])
    if mode != "ssl":
        transform = _cached_transform(_json(pre), "eval", hflip)
        out["image"] = images_to_device(images, transform, device, decode_threads(), gpu_decode=True)
        return out
    transform = _cached_transform(_json(pre), "ssl", hflip)
    decoded = decode_to_uint8(images, device)
    with torch.random.fork_rng(devices=[]):  # v2 draws its parameters from the CPU generator
        if seed is not None:
            rows = batch["id"] if "id" in batch else images
            torch.manual_seed(zlib.crc32("\n".join(map(str, rows)).encode(), seed))
        out["view1"] = torch.stack([transform(image) for image in decoded])
        out["view2"] = torch.stack([transform(image) for image in decoded])
    return out


def _json(pre: dict) -> str:
    import json

    return json.dumps(pre, sort_keys=True)


def device_collate(pre: dict, mode: str, hflip: bool, seed: int | None, device):
    """For `iter_torch_batches(collate_fn=...)` in a training worker (`train.gpu_decode`): Arrow
    batches of encoded rows -> `device_batch`'s tensors on `device`."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class DeviceCollate(ArrowBatchCollateFn):
        def __call__(self, table) -> dict:
            batch = {name: table.column(name).to_pylist() for name in table.column_names if name != "label"}
            if "label" in table.column_names:
                batch["label"] = table.column("label").to_numpy()
            return device_batch(batch, pre, mode, hflip, seed, device)

    return DeviceCollate()
