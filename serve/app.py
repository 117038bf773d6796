"""The repforge Ray Serve application: build it, run it, swap its model and index versions.

    serve run deploy.yaml                                   # the config file
    repforge serve --model runs/quickstart/finetune/model --index runs/quickstart/index
    python -c "import ray; from serve.app import start_app; ray.init(); print(start_app({'model': ...}))"

`build_app(args)` composes the graph: the HTTP ingress (serve.ingress) over a batched
embedder, an optional separate classifier, one retriever per index shard and the live
classes store. Which model and index each replica serves is its `user_config`, so
`swap_versions(model=..., index=...)` (or editing `user_config` in deploy.yaml and
`serve deploy` again) switches versions in place: no replica restarts, requests in
flight finish on the version they started with. An index built from another model is
refused before anything changes.

`start_app` deploys through the Serve controller's config API, the same path as
`serve deploy deploy.yaml`, so a later `swap_versions` is a config update, not a redeploy.
"""

from __future__ import annotations

import json
import time

import ray
from pydantic import ValidationError
from ray import serve

from serve.auth import TOKEN_ENV, TokenError, token_sha256
from serve.classes import ClassesDeployment
from serve.deployments import EmbedderDeployment, RetrieverDeployment
from serve.ingress import RepforgeIngress
from serve.parsing import ApiError, pydantic_message  # noqa: F401  (ApiError: part of this module's API)
from serve.schemas import AppArgs
from system import storage
from system.index import MANIFEST_FILE
from system.models.artifact import ModelError, read_meta
from system.ray_env import ensure_ray

APP_NAME = "repforge"
IMPORT_PATH = "serve.app:build_app"


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
        for key in ("model", "classifier", "classes")
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
        _check_index(uri, model_meta)
    try:
        token_sha256(cfg.token_file)
    except TokenError as err:
        raise ServeArgsError(str(err)) from None
    return cfg, model_meta, classifier_uri


def _check_index(uri: str, model_meta: dict) -> None:
    """Refuse an index built from another model's embeddings: image queries would be meaningless.

    Reads only the manifest: the replica is the one that loads the (possibly large) index.
    """
    fs, path = storage.filesystem(storage.join(uri, MANIFEST_FILE))
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        raise ServeArgsError(f"index: not an index (no readable {MANIFEST_FILE}): {uri}") from None
    # The same rule as system.index.api.check_fingerprint, applied before any replica starts.
    built_from, model = manifest.get("fingerprint"), model_meta.get("fingerprint")
    if built_from and model and built_from != model:
        raise ServeArgsError(f"index: built from model {built_from}, but model {model} is served")


def user_configs(cfg: AppArgs, classifier_uri: str | None) -> dict[str, dict]:
    """Deployment name -> user_config: the versions each serves (what a swap changes)."""
    configs = {"EmbedderDeployment": {"model": cfg.model}}
    if classifier_uri and classifier_uri != cfg.model:
        configs["ClassifierDeployment"] = {"model": classifier_uri}
    shards = index_shards(cfg)
    for i, uri in enumerate(shards):
        configs[_retriever_name(i, len(shards))] = {"model": cfg.model, "index": uri}
    return configs


def _retriever_name(shard: int, shards: int) -> str:
    return "RetrieverDeployment" if shards == 1 else f"RetrieverDeployment{shard}"


def build_app(args: AppArgs | dict) -> serve.Application:
    """The application graph: ingress -> embedder (+ classifier), retriever per shard, classes."""
    cfg, _, classifier_uri = resolve_args(args)
    versions = user_configs(cfg, classifier_uri)
    # Ask for a GPU only where the cluster has one; otherwise the replica would never be placed.
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    # A separate classifier model shares the GPU with the embedder (both fit on one-GPU nodes).
    gpu_share = 0.5 if classifier_uri and classifier_uri != cfg.model else 1
    # Bounded queues: an overloaded model or index answers 503 at once instead of timing out.
    limits = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    model_options = {
        **limits,
        "health_check_period_s": 2,  # a dead replica is noticed and replaced within seconds
        "num_replicas": cfg.embedder_replicas,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, **({"num_gpus": gpu_share} if has_gpu else {})},
    }
    batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
    embedder = EmbedderDeployment.options(user_config=versions["EmbedderDeployment"], **model_options).bind(
        **batching
    )
    classifier = None
    if classifier_uri == cfg.model:
        classifier = embedder
    elif classifier_uri:
        classifier = EmbedderDeployment.options(
            name="ClassifierDeployment", user_config=versions["ClassifierDeployment"], **model_options
        ).bind(**batching)
    shards = index_shards(cfg)
    retrievers = [
        RetrieverDeployment.options(
            name=_retriever_name(i, len(shards)),
            user_config=versions[_retriever_name(i, len(shards))],
            **limits,
        ).bind(cfg.persist_items)
        for i in range(len(shards))
    ]
    classes = ClassesDeployment.bind(cfg.classes)
    # The ingress keeps its own, larger queue (serve.ingress): it only parses and waits, and
    # a request it sheds gets Serve's plain-text 503, while the deployments above shed with
    # the JSON `overloaded` error.
    return RepforgeIngress.bind(
        embedder, classifier, retrievers, classes, cfg.model_dump(), token_sha256(cfg.token_file)
    )


# -- running, swapping, stopping (from a driver process) -----------------------------

_owns_serve = False  # whether start_app started Serve (and so stop_app shuts it down)
_deployed: dict = {}  # the args and user_configs of the app start_app deployed


def start_app(
    args: AppArgs | dict, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 180.0
) -> str:
    """Deploy the app on the current Ray cluster (ray.init() when none); returns its base URL.

    Waits at most `timeout_s` for the replicas and then for /v1/health to answer.
    """
    global _owns_serve
    cfg, _, classifier_uri = resolve_args(args)  # before any Ray work: a bad arg or artifact fails fast
    ensure_ray()
    _owns_serve = _owns_serve or not serve.status().proxies
    serve.start(http_options={"host": host, "port": port})
    deadline = time.monotonic() + timeout_s
    args = cfg.model_dump(mode="json", exclude_defaults=True)
    _deployed.update(args=args, current=args, versions=user_configs(cfg, classifier_uri))
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    try:
        _deploy(deadline)
        _wait_healthy(url, deadline)
        if token_sha256(cfg.token_file):
            _check_auth_on(url)
    except BaseException:  # a failed start must not leave replicas holding the cluster's resources
        stop_app()
        raise
    return url


def swap_versions(
    model: str | None = None,
    index: str | list[str] | None = None,
    classifier: str | None = None,
    timeout_s: float = 180.0,
) -> dict[str, dict]:
    """Switch the running app to another model and/or index, in place; returns the new user_configs.

    Raises ServeArgsError (nothing changes) for a bad artifact, an index built from another
    model, or another number of shards (that needs start_app: new deployments).
    """
    if not _deployed:
        raise ServeArgsError("no app deployed by start_app in this process")
    old = parse_args(_deployed["current"])  # the versions of the last swap, not the first deploy
    changes = {
        key: value for key, value in (("model", model), ("index", index), ("classifier", classifier)) if value
    }
    cfg, _, classifier_uri = resolve_args(old.model_copy(update=changes))
    versions = user_configs(cfg, classifier_uri)
    # Whether /v1/classify has a head is wired into the ingress when it is built.
    if bool(classifier_uri) != bool(resolve_args(old)[2]):
        change = "adds a classification head" if classifier_uri else "drops the classification head"
        raise ServeArgsError(f"swap: the new model {change}; deploy it anew with start_app")
    if set(versions) != set(_deployed["versions"]):
        raise ServeArgsError(
            f"swap: the new versions need deployments {sorted(versions)}, the app has "
            f"{sorted(_deployed['versions'])}; deploy it anew with start_app"
        )
    _deployed.update(versions=versions, current=cfg.model_dump(mode="json", exclude_defaults=True))
    _deploy(time.monotonic() + timeout_s)
    return versions


def _deploy(deadline: float) -> None:
    """Apply the app config (args + per-deployment user_config) and wait until it runs."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": _deployed["args"],
        "deployments": [{"name": name, "user_config": uc} for name, uc in _deployed["versions"].items()],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [config]}))
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING" and _settled(status):
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the serve app failed to deploy: {status.message}")
        time.sleep(0.25)
    status = serve.status().applications.get(APP_NAME)
    states = status.deployments if status else {}
    detail = "; ".join(f"{name}: {d.status} {d.message}".strip() for name, d in states.items())
    raise RuntimeError(f"the serve app was not running in time ({detail})")


def _settled(status) -> bool:
    # RUNNING is reported while an in-place update is still being applied; wait for every
    # deployment to be HEALTHY with nothing updating.
    return all(d.status == "HEALTHY" for d in status.deployments.values()) and bool(status.deployments)


def _wait_healthy(url: str, deadline: float) -> None:
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the serve app did not answer {url}/v1/health in time")


def _check_auth_on(url: str) -> None:
    """The app is built where Serve builds it, whose environment may lack REPFORGE_API_TOKEN:
    a token configured here must show as a 401 there, or the app would run open."""
    import httpx

    if httpx.get(f"{url}/v1/info", timeout=10.0).status_code != 401:
        raise ServeArgsError(
            f"{TOKEN_ENV} is set here but the app was built without it (a cluster started before it "
            "was set?); set it on the cluster or pass token_file"
        )


def stop_app() -> None:
    """Delete the app; shut Serve down too when start_app was the one that started it."""
    global _owns_serve
    _deployed.clear()
    if not ray.is_initialized():
        return
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    if _owns_serve:
        serve.shutdown()
        _owns_serve = False
