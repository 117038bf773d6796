"""The build arguments of the serve app, checked before any Ray work: artifacts readable, the
index built from the served model, a token file that reads; and what each deployment serves.

    .venv/bin/python -m pytest -q tests/test_serve.py -k "bad_args or foreign_index"
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from serve.auth import TokenError, token_sha256
from serve.parsing import pydantic_message
from serve.schemas import AppArgs
from system import storage
from system.compat import CompatError, serving_gate
from system.index import MANIFEST_FILE
from system.models.artifact import ModelError, read_meta


class ServeArgsError(ValueError):
    """A bad build argument: the message is one line naming the argument."""


def parse_args(args: AppArgs | dict) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args)
    except ValidationError as err:
        raise ServeArgsError(f"serve args: {pydantic_message(err.errors())}") from None


def _artifact_meta(name: str, uri: str) -> dict:
    try:
        return read_meta(uri)
    except (ModelError, storage.StorageError, OSError) as err:
        raise ServeArgsError(f"{name}: {err}") from None


def index_shards(cfg: AppArgs) -> list[str]:
    if not cfg.index:
        return []
    return [cfg.index] if isinstance(cfg.index, str) else list(cfg.index)


def resolve_args(args: AppArgs | dict) -> tuple[AppArgs, dict, str | None]:
    """Validate the args and read the artifacts' metadata (no Ray needed). Raises ServeArgsError.

    Returns (args with absolute URIs, model meta, classifier URI or None).
    """
    cfg = parse_args(args)
    update = {
        key: storage.normalize(getattr(cfg, key))
        for key in ("model", "classifier", "classes", "compat")
        if getattr(cfg, key)
    }
    if cfg.index:
        shards = [storage.normalize(uri) for uri in index_shards(cfg)]
        update["index"] = shards[0] if isinstance(cfg.index, str) else shards
    cfg = cfg.model_copy(update=update)
    model_meta = _artifact_meta("model", cfg.model)
    classifier_uri = None
    if cfg.classifier and cfg.classifier != cfg.model:
        if not _artifact_meta("classifier", cfg.classifier).get("num_classes"):
            raise ServeArgsError(f"classifier: {cfg.classifier} has no classification head")
        classifier_uri = cfg.classifier
    elif model_meta.get("num_classes"):
        classifier_uri = cfg.model
    elif cfg.classifier:
        raise ServeArgsError(f"classifier: {cfg.classifier} has no classification head")
    for uri in index_shards(cfg):
        _check_index(uri, model_meta, cfg.compat)
    try:
        token_sha256(cfg.token_file)
    except TokenError as err:
        raise ServeArgsError(str(err)) from None
    return cfg, model_meta, classifier_uri


def _check_index(uri: str, model_meta: dict, compat: str | None = None) -> None:
    """Refuse an index built from another model's embeddings: image queries would be meaningless.

    Reads only the manifest: the replica is the one that loads the (possibly large) index.
    """
    manifest = index_manifest(uri)
    # system.models.artifact.same_model, through the gate, before any replica starts.
    built_from, model = manifest.get("fingerprint"), model_meta.get("fingerprint")
    try:  # another model's index: only with a passing compatibility report for exactly that pair
        serving_gate(compat, built_from, model)
    except CompatError as err:
        raise ServeArgsError(f"index: {err}") from None


def user_configs(cfg: AppArgs, classifier_uri: str | None) -> dict[str, dict]:
    """Deployment name -> user_config: the versions each serves (what a swap changes)."""
    configs = {"EmbedderDeployment": {"model": cfg.model}}
    if classifier_uri and classifier_uri != cfg.model:
        configs["ClassifierDeployment"] = {"model": classifier_uri}
    shards = index_shards(cfg)
    for i, uri in enumerate(shards):
        configs[retriever_name(i, len(shards))] = {"model": cfg.model, "index": uri}
        if cfg.compat:
            configs[retriever_name(i, len(shards))]["compat"] = cfg.compat
    return configs


def retriever_name(shard: int, shards: int) -> str:
    return "RetrieverDeployment" if shards == 1 else f"RetrieverDeployment{shard}"


def index_manifest(uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(uri, MANIFEST_FILE)))
    except (OSError, ValueError):
        raise ServeArgsError(f"index: not an index (no readable {MANIFEST_FILE}): {uri}") from None


def search_in_ingress(cfg: AppArgs) -> bool:
    """Whether the ingress replicas search the index themselves (serve.local_index).

    Only a one-shard app (one retriever) whose index can travel as a snapshot (not on-disk
    lists); under `auto`, only when its FAISS files fit ingress_search_max_bytes, since every
    ingress replica holds a copy.
    """
    shards = index_shards(cfg)
    if cfg.ingress_search == "off" or len(shards) != 1:
        return False
    manifest = index_manifest(shards[0])
    if manifest.get("on_disk"):
        return False
    if cfg.ingress_search == "on":
        return True
    size = 0
    for name in manifest.get("files", ["index.faiss"]):
        fs, path = storage.filesystem(storage.join(shards[0], name))
        size += fs.get_file_info(path).size or 0
    return size <= cfg.ingress_search_max_bytes
