"""Storage URIs: a local folder by default, any pyarrow filesystem (s3://, gs://, ...) on a cluster.

Artifacts are written to a local temporary folder and published whole. On a local or
shared filesystem it is renamed into place (atomic: a crash mid-write never leaves a half
artifact there); an existing folder is swapped with the new one in one step on Linux
(renameat2), so readers always find one whole version at the path. Object stores have no
rename: the folder is uploaded only once it is complete, but an upload cut short (or an
overwrite, which deletes the old copy first) can leave the destination incomplete; rerun
the command with --overwrite.

    .venv/bin/python -m pytest -q tests/test_index.py -k "crash_during_save or replacing_an_artifact"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(ValueError):
    """A user error about a storage location (missing input, existing output)."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str) -> Path:
    return Path(str(uri).removeprefix("file://")).expanduser().resolve()


def normalize(uri: str | os.PathLike) -> str:
    """An absolute local path or a remote URI; Ray workers on other nodes need absolute names."""
    uri = str(uri)
    return uri if is_remote(uri) else str(local_path(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(local_path(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(uri: str, data: bytes) -> None:
    """A small file (a record, a CSV, a PNG) written in one piece, on any filesystem: to a
    temporary name, then renamed, so a crash never leaves a half-written file."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path + ".tmp") as out:
        out.write(data)
    fs.move(path + ".tmp", path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def parquet_rows(file_uri: str) -> int:
    """Rows of one Parquet file, from its footer alone, on any filesystem."""
    import pyarrow.parquet as pq

    fs, path = filesystem(file_uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _parquet_file_infos(uri: str) -> list[pafs.FileInfo]:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"no such dataset: {uri}")
    if info.type == pafs.FileType.File:
        return [info]
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(
        (
            f
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File and f.path.endswith(".parquet") and "/_" not in f.path
        ),
        key=lambda f: f.path,
    )


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a dataset URI (a file, or a folder searched recursively), sorted."""
    files = [f.path for f in _parquet_file_infos(uri)]
    if not files:
        raise StorageError(f"no Parquet files in {uri}")
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        files = [f"{scheme}://{f}" for f in files]
    return files


def parquet_bytes(uri: str) -> int:
    """Total size on storage of a dataset URI's Parquet files."""
    return sum(f.size for f in _parquet_file_infos(uri))


@contextlib.contextmanager
def publish_dir(dest: str, overwrite: bool = False):
    """Yield a local temporary folder; on success it becomes `dest`, on error it is removed."""
    dest = normalize(dest)
    if exists(dest) and not overwrite:
        raise StorageError(f"output exists: {dest} (pass --overwrite to replace it)")
    if is_remote(dest):
        staging = Path(tempfile.mkdtemp(prefix="repforge-"))
    else:
        parent = local_path(dest).parent
        parent.mkdir(parents=True, exist_ok=True)
        # Beside the destination, so the final rename stays on one filesystem (atomic).
        staging = parent / f".{local_path(dest).name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_remote(dest):
        fs, path = filesystem(dest)
        if overwrite and exists(dest):
            fs.delete_dir(path)
        pafs.copy_files(str(staging), path, destination_filesystem=fs)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        target = local_path(dest)
        if not target.exists():
            staging.rename(target)
        elif _exchange(staging, target):  # staging now holds the old version
            shutil.rmtree(staging, ignore_errors=True)
        else:  # two renames: for a moment nothing is at `target`
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    Replacing a folder otherwise takes two renames, and a reader (or a crash) between them
    finds nothing at the path; the retriever replaces its index folder on every change.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) == 0


def download_dir(uri: str) -> Path:
    """A local folder holding the artifact at `uri` (itself when local)."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.exists():
            raise StorageError(f"no such artifact: {uri}")
        return path
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"no such artifact: {uri}")
    local = Path(tempfile.mkdtemp(prefix="repforge-dl-"))
    pafs.copy_files(path, str(local), source_filesystem=fs)
    return local
