"""The device decode path (system/data/device_decode.py), run on CPU tensors: the same pixels as
the PIL path for JPEGs, and PIL's own path (same pixels, same errors) for every other row.

    .venv/bin/python -m pytest -q tests/test_device_decode.py
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from system.data.device_decode import (
    GPU_DECODE_ENV,
    decode_jpegs,
    decode_on_device,
    device_decodable,
    images_to_device,
    preprocess_decoded,
    tensor_steps,
)
from system.data.transforms import eval_transform, images_to_tensor

# resnet50's timm eval transform (resize 235 bicubic, centre crop 224), and a small-image one.
RESNET50 = {"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic", "crop_pct": 0.95}  # fmt: skip
SMALL = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}


def photo(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth random image (upsampled low-frequency noise), about a photo's entropy."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC).convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def grey_levels(a: np.ndarray, b: np.ndarray, pre: dict) -> np.ndarray:
    """|a - b| of two normalised batches, in 0..255 grey levels."""
    return np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(pre["std"])[None, :, None, None] * 255


JPEGS = {
    "square 320": encode(photo(320, 320, 0), quality=90),
    "landscape 480x640": encode(photo(480, 640, 1), quality=85),
    "portrait odd 333x250": encode(photo(333, 250, 2), quality=95),
    "small 40x56": encode(photo(40, 56, 3)),
    "progressive": encode(photo(300, 400, 4), quality=90, progressive=True),
    "4:4:4": encode(photo(256, 256, 5), quality=90, subsampling=0),
    "second 320 (batched with the first)": encode(photo(320, 320, 6), quality=90),
}
OTHERS = {
    "png": encode(photo(200, 240, 7), "PNG"),
    "webp": encode(photo(200, 240, 8), "WEBP", quality=90),
    "grayscale jpeg": encode(photo(200, 240, 9, "L")),
    "cmyk jpeg": encode(photo(200, 240, 10, "CMYK")),
    "rgba png": encode(photo(64, 64, 11, "RGBA"), "PNG"),
}


@pytest.mark.parametrize("pre", [RESNET50, SMALL], ids=["resnet50", "small"])
def test_jpegs_decode_on_device_with_pils_pixels(pre):
    transform = eval_transform(pre)
    images = list(JPEGS.values())
    assert all(device_decodable(data) for data in images)
    expected = images_to_tensor(images, transform)
    got = images_to_device(images, transform, "cpu", gpu_decode=True)
    assert got.shape == expected.shape and got.dtype == torch.float32
    diff = grey_levels(got.numpy(), expected, pre)
    assert diff.max() <= 2.5 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_float_resize_as_on_gpus_stays_within_two_grey_levels():
    """A GPU resizes in float32 (no uint8 rounding); run that branch here on the CPU."""
    transform = eval_transform(RESNET50)
    images = list(JPEGS.values())
    decoded = decode_jpegs(images, "cpu")
    got = preprocess_decoded(decoded, tensor_steps(transform), resize_in_float=True)
    diff = grey_levels(got.numpy(), images_to_tensor(images, transform), RESNET50)
    assert diff.max() <= 2.0 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_other_rows_take_the_pil_path_in_their_place():
    """PNG, WebP, grayscale and CMYK rows: bit-identical to the PIL path, in batch order."""
    transform = eval_transform(RESNET50)
    assert not any(device_decodable(data) for data in OTHERS.values())
    names = ["square 320", "png", "webp", "progressive", "grayscale jpeg", "cmyk jpeg", "rgba png", "4:4:4"]
    images = [{**JPEGS, **OTHERS}[name] for name in names]
    got = images_to_device(images, transform, "cpu", gpu_decode=True).numpy()
    expected = images_to_tensor(images, transform)
    for row, name in enumerate(names):
        if name in OTHERS:
            np.testing.assert_array_equal(got[row], expected[row], err_msg=name)
        else:
            assert grey_levels(got[row : row + 1], expected[row : row + 1], RESNET50).max() <= 2.5, name


def truncated() -> bytes:
    data = JPEGS["square 320"]
    return data[: len(data) // 2]


def scrambled() -> bytes:
    """Header and EOI intact, entropy-coded data overwritten: whatever PIL makes of it, so do we."""
    data = bytearray(JPEGS["landscape 480x640"])
    start = data.index(b"\xff\xda") + 200
    data[start : start + 400] = bytes(range(200)) * 2
    return bytes(data)


@pytest.mark.parametrize(
    "bad",
    [truncated(), b"not an image at all", b"\xff\xd8\xff\xd9", b""],
    ids=["truncated", "text", "empty jpeg", "empty"],
)
def test_corrupt_rows_fail_with_pils_error(bad):
    transform = eval_transform(SMALL)
    images = [JPEGS["square 320"], bad, OTHERS["png"]]
    with pytest.raises(Exception) as pil_error:
        images_to_tensor(images, transform)
    with pytest.raises(type(pil_error.value)):
        images_to_device(images, transform, "cpu", gpu_decode=True)


def test_a_row_the_decoder_refuses_goes_to_pil():
    transform = eval_transform(SMALL)
    images = [JPEGS["small 40x56"], scrambled(), JPEGS["square 320"]]
    try:
        expected = images_to_tensor(images, transform)
    except Exception as err:  # PIL refuses it: so must we, with the same error
        with pytest.raises(type(err)):
            images_to_device(images, transform, "cpu", gpu_decode=True)
        return
    got = images_to_device(images, transform, "cpu", gpu_decode=True).numpy()
    assert grey_levels(got[[0, 2]], expected[[0, 2]], SMALL).max() <= 2.5
    assert got.shape == expected.shape and np.isfinite(got).all()


def test_which_rows_and_devices_decode_on_the_device(monkeypatch):
    header_only = JPEGS["square 320"][:600]
    assert not device_decodable(header_only)  # no EOI: truncated
    assert not device_decodable(encode(photo(64, 64, 1), "JPEG", quality=90)[:-2] + b"\x00\x00")
    assert decode_on_device("cuda") and decode_on_device("cuda:1")
    assert not decode_on_device("cpu")
    assert decode_on_device("cpu", gpu_decode=True) and not decode_on_device("cuda", gpu_decode=False)
    monkeypatch.setenv(GPU_DECODE_ENV, "0")
    assert not decode_on_device("cuda")
    # The CPU default is the PIL path itself, bit for bit.
    transform = eval_transform(SMALL)
    images = list(JPEGS.values())[:3]
    np.testing.assert_array_equal(
        images_to_device(images, transform).numpy(), images_to_tensor(images, transform)
    )


def test_a_transform_other_than_timms_eval_keeps_every_row_on_pil():
    from torchvision.transforms import v2

    odd = v2.Compose([v2.PILToTensor(), v2.Resize((24, 24)), v2.ToDtype(torch.float32, scale=True)])
    assert tensor_steps(odd) is None
    images = [JPEGS["small 40x56"], OTHERS["png"]]
    got = images_to_device(images, odd, "cpu", gpu_decode=True)
    np.testing.assert_array_equal(got.numpy(), images_to_tensor(images, odd))


@pytest.mark.parametrize("pre", [SMALL, {**SMALL, "size": 64}], ids=["32px", "64px with blur"])
def test_training_batches_on_the_device_match_the_cpu_tasks(pre):
    """train.gpu_decode: eval batches as preprocess_batch makes them; SSL views seeded alike."""
    from system.data.device_decode import device_batch
    from system.data.transforms import preprocess_batch

    names = ["square 320", "png", "small 40x56", "grayscale jpeg", "webp", "progressive"]
    batch = {
        "image": [{**JPEGS, **OTHERS}[name] for name in names],
        "label": np.arange(len(names)),
        "id": [f"row-{i}" for i in range(len(names))],
    }
    got = device_batch(batch, pre, "eval", True, None, "cpu")
    expected = preprocess_batch(batch, pre, "eval")
    assert grey_levels(got["image"].numpy(), expected["image"], pre).max() <= 2.5
    assert got["label"].tolist() == list(range(len(names)))
    views = device_batch(batch, pre, "ssl", True, 7, "cpu")
    assert views["view1"].shape == (len(names), 3, pre["size"], pre["size"])
    assert not torch.equal(views["view1"], views["view2"])
    again = device_batch(batch, pre, "ssl", True, 7, "cpu")
    assert torch.equal(views["view1"], again["view1"]) and torch.equal(views["view2"], again["view2"])
    other_seed = device_batch(batch, pre, "ssl", True, 8, "cpu")
    assert not torch.equal(views["view1"], other_seed["view1"])
    # Normalised as the CPU views are: roughly zero-mean, unit-range pixels.
    assert views["view1"].abs().max() <= 1 / min(pre["std"]) + 1e-4


def test_compile_and_gpu_decode_are_refused_in_one_line_where_they_cannot_apply():
    from system.config import ConfigError, build_config, check_gpu_options

    assert build_config({}).train.compile is None  # unset: on for GPU workers, off on CPUs
    assert build_config({}).train.gpu_decode is False
    for key in ("compile", "gpu_decode"):
        with pytest.raises(ConfigError, match=rf"^train\.{key}: .*use_gpu is false$"):
            build_config({"train": {"use_gpu": False, key: True}})
        with pytest.raises(ConfigError, match=rf"^train\.{key}: "):
            build_config({"train": {key: "sometimes"}})
        cfg = build_config({"train": {key: True}})  # use_gpu unset: decided by the cluster
        with pytest.raises(
            ConfigError, match=rf"^train\.{key}: needs GPU workers, and this cluster has no GPUs$"
        ):
            check_gpu_options(cfg.train, use_gpu=False)
        check_gpu_options(cfg.train, use_gpu=True)
    check_gpu_options(build_config({"train": {"compile": False}}).train, use_gpu=False)
    check_gpu_options(build_config({}).train, use_gpu=False)  # the defaults run on CPUs


def test_workers_collate_encoded_rows_on_their_device(ray_local):
    """train.gpu_decode's input: Ray Data hands the worker encoded rows, device_collate decodes them."""
    import pyarrow as pa
    import ray

    from system.data.device_decode import device_collate
    from system.data.transforms import preprocess_batch

    images = [JPEGS["square 320"], OTHERS["png"], JPEGS["small 40x56"], OTHERS["webp"]] * 2
    table = pa.table({"id": [str(i) for i in range(8)], "image": images, "label": list(range(8))})
    collate = device_collate(SMALL, "eval", True, None, torch.device("cpu"))
    batches = list(ray.data.from_arrow(table).iterator().iter_torch_batches(batch_size=4, collate_fn=collate))
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    expected = preprocess_batch({"image": images}, SMALL)["image"]
    got = torch.cat([b["image"] for b in batches]).numpy()
    assert grey_levels(got, expected, SMALL).max() <= 2.5


@pytest.mark.gpu
def test_nvjpeg_on_the_gpu_gives_pils_pixels_within_a_few_grey_levels():
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a grey level or two."""
    transform = eval_transform(RESNET50)
    images = [*JPEGS.values(), *OTHERS.values()]
    got = images_to_device(images, transform, "cuda")
    assert got.device.type == "cuda" and got.dtype == torch.float32
    diff = grey_levels(got.cpu().numpy(), images_to_tensor(images, transform), RESNET50)
    assert diff[: len(JPEGS)].mean() < 1.0 and np.percentile(diff[: len(JPEGS)], 99.9) <= 8, diff.max()
    assert diff[len(JPEGS) :].max() <= 1e-3  # the PIL rows, moved to the GPU
