"""A fitted adapter from a new model's space into an old one's, and its artifact.

    repforge compat fit --old runs/v1/model --new runs/v2/model \
        --data runs/datasets/digits/train --out runs/v2-to-v1

`run_fit` embeds a sample of the dataset with both models (Ray Data, `system.embed.run_embed`),
fits every map kind of system.compat.maps, keeps the best on held-out cross-model
retrieval, and publishes the adapter artifact: a folder with

    adapter.safetensors   the map's arrays (weight, bias; fc1/fc2 for an mlp)
    adapter.json          kind, the old and new model fingerprints and URIs, dims, whether the
                          output is L2-normalised, the held-out scores of every kind, fit time,
                          and the adapter's own fingerprint (hash of adapter.safetensors)

    .venv/bin/python -m pytest -q tests/test_compat.py -k fit
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from system import storage
from system.compat.maps import KINDS, MapError, apply_map, choose_map
from system.models.artifact import fingerprint_file, read_meta

WEIGHTS = "adapter.safetensors"
META = "adapter.json"
FIT_ROWS = 10_000  # default sample: the maps have at most a few hundred thousand parameters


class CompatError(ValueError):
    """A user error in a compatibility job (bad input, mismatched artifacts): one line."""


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter artifact: `map(vectors)` takes new-model vectors into the old space."""

    uri: str
    meta: dict
    params: dict

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def map(self, vectors: np.ndarray) -> np.ndarray:
        return apply_map(self.params, vectors, self.meta["normalize"])


@dataclass
class Embedded:
    """One dataset embedded by one model: ids, vectors, labels (or None) and the model meta."""

    ids: list[str]
    vectors: np.ndarray
    labels: np.ndarray | None
    meta: dict


_EMBEDDED: dict[tuple, Embedded] = {}  # this process's embedding runs, reused (a gate scores 3 pairs)
CACHED_RUNS = 8


def _data_stamp(data_uri: str) -> tuple:
    """The dataset's files with their sizes and modification times: a changed file is a new key."""
    files = storage.parquet_files(data_uri)
    fs, _ = storage.filesystem(files[0])
    infos = fs.get_file_info([storage.filesystem(f)[1] for f in files])
    return tuple((i.path, i.size, i.mtime_ns) for i in infos)


def embed_dataset(model_uri: str, data_uri: str, work: Path, limit: int | None = None) -> Embedded:
    """Embed `data_uri` (its first `limit` rows) with the model through Ray Data, into `work`.

    The same model, data and limit in one process (a gate, a benchmark) are embedded once."""
    from system.embed.batch import read_embeddings, run_embed

    meta = read_meta(model_uri)
    from system.data.dataset import count_rows

    rows = count_rows(data_uri, limit)  # a limit past the end is no limit: the same run
    key = (meta["fingerprint"], storage.normalize(data_uri), rows, _data_stamp(data_uri))
    if key in _EMBEDDED:
        return _EMBEDDED[key]
    out = work / f"emb-{len(list(work.iterdir()))}"
    run_embed(model_uri, data_uri, str(out), limit=limit, progress_every_s=60.0)
    ids, vectors, rest, _ = read_embeddings(str(out))
    labels = np.asarray(rest.column("label").to_pylist()) if "label" in rest.column_names else None
    while len(_EMBEDDED) >= CACHED_RUNS:
        _EMBEDDED.pop(next(iter(_EMBEDDED)))
    _EMBEDDED[key] = Embedded(ids, vectors, labels, meta)
    return _EMBEDDED[key]


def paired(reference: Embedded, other: Embedded) -> np.ndarray:
    """`other`'s vectors in `reference`'s row order (Ray Data returns rows in any order)."""
    row = {item: i for i, item in enumerate(other.ids)}
    missing = [item for item in reference.ids if item not in row]
    if missing or len(row) != len(other.ids):
        raise CompatError(f"the two embedding runs hold different rows ({missing[:1]}); ids must be unique")
    return other.vectors[[row[item] for item in reference.ids]]


def model_meta(name: str, uri: str) -> dict:
    """The model.json of `uri`, or CompatError naming the argument."""
    try:
        return read_meta(storage.normalize(uri))
    except (ValueError, OSError) as err:
        raise CompatError(f"{name}: {str(err).splitlines()[0]}") from None


def save_adapter(uri: str, params: dict, meta: dict, overwrite: bool = False) -> dict:
    """Publish the adapter artifact atomically; returns its full meta (with its fingerprint)."""
    from safetensors.numpy import save_file

    with storage.publish_dir(uri, overwrite=overwrite) as staging:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}, str(staging / WEIGHTS))
        meta = {**meta, "fingerprint": fingerprint_file(staging / WEIGHTS)}
        (staging / META).write_text(json.dumps(meta, indent=2))
    return meta


def load_adapter(uri: str) -> Adapter:
    from safetensors.numpy import load_file

    uri = storage.normalize(uri)
    try:
        folder = storage.download_dir(uri)
        meta = json.loads((folder / META).read_text())
        params = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as err:
        raise CompatError(f"adapter: not an adapter artifact ({META} + {WEIGHTS}): {uri} ({err})") from None
    if fingerprint_file(folder / WEIGHTS) != meta.get("fingerprint"):
        raise CompatError(f"adapter: {uri}: {WEIGHTS} does not match the fingerprint in {META}")
    return Adapter(uri, meta, params)


def fit_adapter(
    new: np.ndarray, old: np.ndarray, new_meta: dict, old_meta: dict, kinds=KINDS
) -> tuple[dict, dict]:
    """Fit and pick the map for paired rows (new[i], old[i] embed the same image): (params, meta)."""
    start = time.perf_counter()
    normalize = bool(old_meta.get("normalize", True))
    try:
        kind, params, scores = choose_map(new, old, tuple(kinds), normalize)
    except MapError as err:
        raise CompatError(str(err)) from None
    meta = {
        "kind": kind,
        "old": {"fingerprint": old_meta["fingerprint"], "timm_name": old_meta.get("timm_name")},
        "new": {"fingerprint": new_meta["fingerprint"], "timm_name": new_meta.get("timm_name")},
        "dim_in": int(new.shape[1]),
        "dim_out": int(old.shape[1]),
        "normalize": normalize,
        "heldout_self_top1": scores,
        "fit_rows": int(len(new)),
        "fit_seconds": round(time.perf_counter() - start, 3),
        "parameters": int(sum(v.size for v in params.values())),
    }
    return params, meta


def run_fit(
    old_uri: str,
    new_uri: str,
    data_uri: str,
    out_uri: str,
    limit: int | None = FIT_ROWS,
    kinds=KINDS,
    overwrite: bool = False,
) -> str:
    """Embed a sample with both models, fit the map new -> old, publish the adapter; returns its URI."""
    old_uri, new_uri, data_uri, out_uri = (
        storage.normalize(u) for u in (old_uri, new_uri, data_uri, out_uri)
    )
    old_meta, new_meta = model_meta("--old", old_uri), model_meta("--new", new_uri)
    if storage.exists(out_uri) and not overwrite:
        raise CompatError(f"--out: output exists: {out_uri} (pass --overwrite to replace it)")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise CompatError(f"--kinds: unknown map kind {unknown[0]!r} (known: {', '.join(KINDS)})")
    work = Path(tempfile.mkdtemp(prefix="repforge-compat-"))
    try:
        embed_start = time.perf_counter()
        old = embed_dataset(old_uri, data_uri, work, limit)
        new = embed_dataset(new_uri, data_uri, work, limit)
        embed_seconds = time.perf_counter() - embed_start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    new_vectors = paired(old, new)
    params, meta = fit_adapter(new_vectors, old.vectors, new_meta, old_meta, kinds)
    meta["old"]["uri"], meta["new"]["uri"], meta["data"] = old_uri, new_uri, data_uri
    meta["embed_seconds"] = round(embed_seconds, 3)
    meta = save_adapter(out_uri, params, meta, overwrite)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in meta["heldout_self_top1"].items())
    print(f"compat fit: {meta['kind']} chosen (held-out self top-1: {scores}) in {meta['fit_seconds']} s")
    return out_uri
