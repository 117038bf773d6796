"""deploy.yaml and cluster/: what a user deploys is checked against Ray's own schemas and
against the code it names (no Ray instance, no cluster: seconds).

- The Serve config (deploy.yaml, and the RayService's serveConfigV2) validates against
  Ray's ServeDeploySchema with no key that it would silently drop, its app args against
  serve.schemas.AppArgs, its import path imports, and its deployments are the app's.
- The KubeRay manifests parse and agree with the image (rayVersion, the packages it copies).
- Every `python -m repforge ...` command in cluster/ (RayJob entrypoint, comments, README)
  parses with the real CLI parser, and a job's --config/--set validate as the job would.
- The runtime_env and the cluster launcher config validate with Ray's own checks.

    .venv/bin/python -m pytest -q tests/test_deploy_config.py
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = sorted(CLUSTER.glob("kuberay-*.yaml"))
KINDS = {"RayCluster", "RayJob", "RayService"}


def kuberay(kind: str) -> dict:
    docs = [doc for path in KUBERAY for doc in yaml.safe_load_all(path.read_text()) if doc]
    return next(doc for doc in docs if doc["kind"] == kind)


def serve_configs() -> dict[str, dict]:
    return {
        "deploy.yaml": yaml.safe_load((ROOT / "deploy.yaml").read_text()),
        "RayService serveConfigV2": yaml.safe_load(kuberay("RayService")["spec"]["serveConfigV2"]),
    }


def dropped_keys(given, kept, where: str = "") -> list[str]:
    """Keys of `given` that pydantic dropped (Ray's schemas ignore unknown keys: a typo such
    as `max_ongoin_requests` would deploy with the default and no word)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        dropped = [f"{where}{name}" for name in given if name not in kept]
        for name in set(given) & set(kept):
            dropped += dropped_keys(given[name], kept[name], f"{where}{name}.")
        return dropped
    if isinstance(given, list) and isinstance(kept, list):
        return [k for i, (g, c) in enumerate(zip(given, kept)) for k in dropped_keys(g, c, f"{where}{i}.")]
    return []


@pytest.mark.parametrize("source", list(serve_configs()))
def test_serve_config_validates_against_ray_schema(source):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from serve.schemas import AppArgs

    config = serve_configs()[source]
    schema = ServeDeploySchema.model_validate(config)  # raises on a bad value
    kept = schema.model_dump(exclude_unset=True)
    assert dropped_keys(config, kept) == [], f"{source}: keys Ray's schema does not know"
    assert len(schema.applications) == 1
    app = schema.applications[0]
    AppArgs.model_validate(app.args)  # extra="forbid": an unknown or bad arg raises

    module_name, _, attr = app.import_path.partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), app.import_path
    # The deployments the app composes (a retriever per index shard: RetrieverDeployment0, 1, ...).
    composed = {d.name for d in vars(module).values() if isinstance(d, serve.Deployment)}
    assert {"RepforgeIngress", "EmbedderDeployment", "RetrieverDeployment"} <= composed, composed
    for deployment in app.deployments:
        assert re.sub(r"\d+$", "", deployment.name) in composed, f"{source}: {deployment.name}"


def test_kuberay_manifests_parse_and_match_the_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    kinds = set()
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in KINDS, path.name
            kinds.add(doc["kind"])
            spec = doc["spec"]
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
            assert cluster["rayVersion"] == ray_version, f"{path.name}: rayVersion vs the Dockerfile"
            assert cluster["headGroupSpec"]["template"]["spec"]["containers"], path.name
    assert kinds == KINDS

    # The image holds every package pyproject installs (the entry point `repforge` included:
    # `python -m repforge` runs from it) and the presets the RayJob names by path.
    include = re.search(r"^include = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    packages = set(re.findall(r'"(\w+)\*"', include))  # [tool.setuptools.packages.find]
    assert "repforge" in packages
    copied = set(re.findall(r"^COPY (?:--\S+ )*(\S+) ", dockerfile, re.M))
    missing = (packages | {"configs"}) - copied
    assert not missing, f"cluster/Dockerfile copies no {sorted(missing)}"


def repforge_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `python -m repforge ...` in cluster/: the RayJob entrypoints and
    the commands in comments and the README (lines joined at a trailing backslash)."""
    found = [
        (f"{path.name} entrypoint", doc["spec"]["entrypoint"])
        for path in KUBERAY
        for doc in yaml.safe_load_all(path.read_text())
        if doc["kind"] == "RayJob"
    ]
    for path in sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".md", "")):
        lines = [re.sub(r"^\s*# ?", "", line) for line in path.read_text().splitlines()]
        text = re.sub(r"\\\n", " ", "\n".join(lines))
        found += [(path.name, m) for m in re.findall(r"python -m repforge [^\n#`]*", text)]
    return [(where, shlex.split(command)[3:]) for where, command in found]


def test_cluster_commands_exist_and_their_configs_validate():
    from repforge.cli import build_parser
    from repforge.commands.common import job_config

    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    commands = repforge_commands()
    assert any("entrypoint" in where for where, _ in commands)
    assert {argv[0] for _, argv in commands} >= {"pretrain", "finetune", "embed", "index"}
    parser = build_parser()
    for where, argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `repforge {shlex.join(argv)}` does not parse")
        if getattr(args, "config", None):
            # In the image the presets sit under its WORKDIR (cluster/Dockerfile).
            config = Path(args.config)
            if config.is_relative_to(workdir):
                config = config.relative_to(workdir)
            args.config = str(ROOT / config)
            job_config(args)  # the job's own validation: an unknown key or a bad value raises


def test_runtime_envs_use_only_fields_ray_knows():
    from ray.runtime_env import RuntimeEnv

    envs = {
        "runtime_env.yaml": yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()),
        "RayJob runtimeEnvYAML": yaml.safe_load(kuberay("RayJob")["spec"]["runtimeEnvYAML"]),
    }
    for where, env in envs.items():
        # RuntimeEnv takes unknown fields as plugins, which fail only on the cluster.
        assert set(env) <= RuntimeEnv.known_fields, f"{where}: {set(env) - RuntimeEnv.known_fields}"
        RuntimeEnv(**env)
        # system.train.run passes OMP_NUM_THREADS to ray.init(); Ray refuses a job that repeats it.
        assert "OMP_NUM_THREADS" not in env.get("env_vars", {}), where


def test_cluster_launcher_config_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())))
