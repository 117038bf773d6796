"""Running the serve app from a driver process: start it, swap its model and index versions in
place, stop it. `repforge serve` and the quickstart call these; `serve deploy deploy.yaml` is
the same deployment through the same config API.

    python -c "import ray; from serve.control import start_app; ray.init(); print(start_app({'model': ...}))"

`start_app` deploys through the Serve controller's config API, so a later `swap_versions`
is a config update, not a redeploy: no replica restarts, requests in flight finish on the
version they started with. An index built from another model is refused before anything
changes.

Ray Serve's own settings are environment variables read when Ray's processes start
(RAY_SERVE_FLAGS below): a local instance that start_app starts gets them; on a cluster they
belong in `ray start`'s environment (cluster/ manifests set them).
"""

from __future__ import annotations

import os
import time

import ray
from ray import serve

from serve.args import ServeArgsError, parse_args, resolve_args, user_configs
from serve.auth import TOKEN_ENV, token_sha256
from serve.schemas import AppArgs
from system.ray_env import ensure_ray

APP_NAME = "repforge"
IMPORT_PATH = "serve.app:build_app"
# Chosen by benchmarks/bench_serve.py (rows in benchmarks/RESULTS.md, docs/serving.md): on a
# 2-core machine HAProxy in front of the ingress replicas (direct ingress, no Serve proxy hop)
# took /v1/search from p50 14.0 ms, 125 req/s to 3.7 ms, 219 req/s; running the replicas' user
# code on their own event loop (no thread hop per request, one of the settings
# RAY_SERVE_THROUGHPUT_OPTIMIZED bundles) took it on to 3.0-3.1 ms (x1.38-1.47 a bare uvicorn
# app; Serve's floor, the bare handler in a replica, was x1.21-1.27). HAProxy binds the
# replicas' HTTP ports on all interfaces (so HAProxy on other nodes reaches them); auth still
# applies. User code on the replica's loop: a long synchronous call (the embedder's forward
# pass) holds that replica's requests, as it does with the thread too.
RAY_SERVE_FLAGS: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def serve_flags() -> None:
    """Put RAY_SERVE_FLAGS into this process's environment (where not set), for a Ray instance
    it starts; a variable already set (to 0 or 1) wins."""
    for name, value in RAY_SERVE_FLAGS.items():
        os.environ.setdefault(name, value)


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
    if not ray.is_initialized():
        serve_flags()
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
    compat: str | None = None,
) -> dict[str, dict]:
    """Switch the running app to another model and/or index, in place; returns the new user_configs.

    Raises ServeArgsError (nothing changes) for a bad artifact, an index built from another
    model, or another number of shards (that needs start_app: new deployments).
    """
    if not _deployed:
        raise ServeArgsError("no app deployed by start_app in this process")
    old = parse_args(_deployed["current"])  # the versions of the last swap, not the first deploy
    changes = {
        key: value
        for key, value in (("model", model), ("index", index), ("classifier", classifier), ("compat", compat))
        if value
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
    if _deployed["args"].get("access_log") is False:  # args hold non-default fields only
        config["logging_config"] = {"enable_access_log": False}
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
