"""Upgrading a model without re-indexing: compatible training, fitted adapters, the gate, serving.

    .venv/bin/python -m pytest -q tests/test_compat.py

On the real sklearn digits: an old model, a new one trained from another seed without
compatibility, and the same new training with `objective.compatible_with` (all three
trained in-process with the project's own TrainModule, objective and optimizer; the
Ray Train path is the `slow` case at the end). The gate (`repforge compat check`, a real
Ray Data embedding of both datasets with both models) must fail the first pair, pass the
second, and pass the first through a fitted adapter; its numbers are recomputed here by
brute force; serving refuses the pair without a report and accepts it with one.
"""

from __future__ import annotations

import contextlib
import io
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from repforge.cli import main
from system import storage
from system.compat import CompatError, apply_map, choose_map, fit_map, load_adapter, serving_gate
from system.config import load_config
from system.data.transforms import eval_transform, images_to_tensor
from system.embed.batch import embed_images
from system.models.artifact import Embedder, load_artifact, save_model
from system.objectives.compatible import CompatibleObjective
from system.train.module import build_model, train_mode
from system.train.optim import build_optimizer

STEPS = 60
OLD_STEPS = 20  # the old model is the weaker one: an upgrade is a better model
LIMIT = "600"  # gallery rows embedded (digits are shuffled: every class is in them)
SIZE = 16


def digits_tensors(uri: str, pre: dict) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(storage.parquet_files(uri))
    images = images_to_tensor(table.column("image").to_pylist(), eval_transform(pre), 1)
    return torch.from_numpy(images), torch.tensor(table.column("label").to_pylist())


def train_model(uri: str, train_uri: str, seed: int, overrides=(), steps: int = STEPS) -> dict:
    """A supervised test_resnet trained in-process by the module a Train worker builds; its artifact."""
    cfg = load_config(
        None,
        [
            f"data.train={train_uri}",
            f"data.image_size={SIZE}",
            "model.name=test_resnet",
            "objective.name=supervised",
            "train.lr=0.005",
            f"seed={seed}",
            *overrides,
        ],
    )
    torch.manual_seed(seed)
    module = build_model(cfg, "pretrain", 10)
    from system.data.transforms import preprocessing_config

    pre = preprocessing_config(module.backbone, SIZE)
    images, labels = digits_tensors(train_uri, pre)
    optimizer = build_optimizer(module, cfg.train)
    generator = torch.Generator().manual_seed(seed)
    train_mode(module)
    for _ in range(steps):
        rows = torch.randint(0, len(labels), (64,), generator=generator)
        loss, _ = module({"image": images[rows], "label": labels[rows]})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embedder = Embedder(module.backbone, num_classes=10)
    embedder.head.load_state_dict(module.objective.head.state_dict())
    meta = {
        "timm_name": "test_resnet",
        "timm_kwargs": {},
        "preprocessing": pre,
        "classes": list("0123456789"),
    }
    return save_model(uri, embedder.eval(), meta)


@pytest.fixture(scope="module")
def models(digits_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compat")
    torch.set_num_threads(1)
    uris = {name: str(root / name) for name in ("old", "new", "bct")}
    train_model(uris["old"], digits_data[0], seed=0, steps=OLD_STEPS)
    train_model(uris["new"], digits_data[0], seed=1)
    train_model(uris["bct"], digits_data[0], 1, [f"objective.compatible_with={uris['old']}"])
    return {**uris, "root": root}


def run_cli(*argv) -> tuple[int, str]:
    """`repforge ARGV` in this process: (exit code, the last line it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue().strip().splitlines()[-1]


def test_maps_recover_a_known_map():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(600, 16)).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0].astype(np.float32)
    new = old @ rotation.T + 0.01 * rng.normal(size=old.shape).astype(np.float32)
    params = fit_map("procrustes", new, old)
    np.testing.assert_allclose(params["weight"], rotation, atol=0.02)
    kind, params, scores = choose_map(new, old, normalize=False)
    assert scores[kind] == max(scores.values()) > 0.95
    np.testing.assert_allclose(apply_map(params, new, normalize=False), old, atol=0.1)
    # The mlp's numpy forward is the torch module's (GELU, tanh form): fitted on a nonlinear map.
    mlp = fit_map("mlp", new, np.tanh(old))
    assert (
        (apply_map(mlp, new, True) * apply_map(fit_map("affine", new, np.tanh(old)), new, True)).sum(1)
    ).mean() > 0.9
    with pytest.raises(ValueError, match="kind"):
        fit_map("rotation", new, old)


def test_objective_hides_the_old_model(models, digits_data):
    cfg = load_config(
        None,
        [
            f"data.image_size={SIZE}",
            "model.name=test_resnet",
            "objective.name=supervised",
            f"objective.compatible_with={models['old']}",
        ],
    )
    module = build_model(cfg, "pretrain", 10)
    assert isinstance(module.objective, CompatibleObjective)
    plain = build_model(
        load_config(None, ["model.name=test_resnet", "objective.name=supervised"]), "pretrain", 10
    )
    # Same trainable parameters as without it: DDP, the optimizer and checkpoints never see the old model.
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in plain.parameters())
    assert module.objective.head is module.objective.inner.head
    old, _ = load_artifact(models["old"])
    images, labels = digits_tensors(digits_data[0], load_artifact(models["old"])[1]["preprocessing"])
    loss, extra = module({"image": images[:32], "label": labels[:32]})
    loss.backward()
    assert extra["compat_loss"] > 0
    assert all(p.grad is None for p in module.objective._old[0].parameters())
    wide = load_config(None, ["model.name=resnet10t", f"objective.compatible_with={models['old']}"])
    with pytest.raises(ValueError, match="objective.compatible_with: the old model embeds in"):
        build_model(wide, "pretrain", 0)


@pytest.fixture(scope="module")
def gate(models, digits_data, ray_local) -> dict:
    """The gate as a user runs it: `compat check` of (old, new) and (old, bct); `compat fit` of
    (old, new) and the check through that adapter. {name: (exit code, last line, report)}."""
    train_uri, test_uri = digits_data
    common = ["--gallery", train_uri, "--queries", test_uri, "--k", "5", "--limit", LIMIT]
    root, runs = models["root"], {}
    for name in ("new", "bct"):
        out = str(root / f"report-{name}.json")
        code, last = run_cli(
            "compat", "check", "--old", models["old"], "--new", models[name], *common, "--out", out
        )
        runs[name] = (code, last, json.loads(storage.read_text(out)))
    adapter = str(root / "adapter")
    argv = ["--old", models["old"], "--new", models["new"]]
    runs["fit"] = (
        *run_cli("compat", "fit", *argv, "--data", train_uri, "--out", adapter, "--limit", LIMIT),
        None,
    )
    out = str(root / "report-adapter.json")
    code, last = run_cli("compat", "check", *argv, *common, "--adapter", adapter, "--out", out)
    runs["adapter"] = (code, last, json.loads(storage.read_text(out)))
    return runs


def test_gate_fails_without_compatibility_and_passes_with_it(models, gate):
    code, last, report = gate["new"]
    print("no compat:", {k: report[k] for k in ("old_old", "new_old", "new_new")})
    assert last == str(models["root"] / "report-new.json")
    assert code == 1 and not report["compatible"]
    assert report["old_old"] > 0.85 and report["new_new"] > 0.85
    assert report["new_old"] < 0.3  # near chance (0.1): another seed's space means nothing to the old index
    code, last, report = gate["bct"]
    print("compatible_with:", {k: report[k] for k in ("old_old", "new_old", "new_new")})
    assert last == str(models["root"] / "report-bct.json")
    assert code == 0 and report["compatible"] and report["new_old"] >= report["old_old"]
    assert report["new_new"] > 0.85


def test_fitted_adapter_passes_the_gate(models, digits_data, gate):
    train_uri, test_uri = digits_data
    adapter = str(models["root"] / "adapter")
    assert gate["fit"][:2] == (0, adapter)
    meta = load_adapter(adapter).meta
    assert meta["old"]["fingerprint"] == load_artifact(models["old"])[1]["fingerprint"]
    assert meta["new"]["fingerprint"] == load_artifact(models["new"])[1]["fingerprint"]
    code, last, report = gate["adapter"]
    print("adapter:", meta["kind"], {k: report[k] for k in ("old_old", "new_old", "new_new")})
    assert code == 0 and last == str(models["root"] / "report-adapter.json") and report["compatible"]
    assert report["adapter"]["fingerprint"] == meta["fingerprint"]
    # Bad input: exit 2, one line.
    argv = ["--old", models["old"], "--new", models["new"], "--gallery", train_uri]
    assert (
        main(["compat", "check", *argv, "--queries", test_uri, "--adapter", str(models["root"] / "nothing")])
        == 2
    )
    assert main(["compat", "check", *argv, "--queries", str(models["root"])]) == 2


def brute_force(queries, query_labels, gallery, gallery_labels, k: int) -> tuple[float, float]:
    """Top-1 and mAP@k by the definitions, one query at a time."""
    top1, aps = 0, []
    for q, label in zip(queries, query_labels):
        order = sorted(range(len(gallery)), key=lambda i: -float(np.dot(q, gallery[i])))[:k]
        top1 += gallery_labels[order[0]] == label
        hits, precision_sum = 0, 0.0
        for rank, i in enumerate(order, 1):
            if gallery_labels[i] == label:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / min(k, sum(1 for g in gallery_labels if g == label)))
    return top1 / len(queries), float(np.mean(aps))


def test_report_numbers_equal_brute_force(models, digits_data, gate):
    report = json.loads(storage.read_text(str(models["root"] / "report-adapter.json")))
    adapter = load_adapter(str(models["root"] / "adapter"))
    vectors, labels = {}, {}
    for side in ("old", "new"):
        model, meta = load_artifact(models[side])
        for name, uri in zip(("gallery", "queries"), digits_data):
            table = pq.read_table(storage.parquet_files(uri))[: int(LIMIT)]  # the rows the gate embedded
            with torch.inference_mode():
                vectors[side, name] = embed_images(
                    model, meta["preprocessing"], table.column("image").to_pylist()
                )
            labels[name] = table.column("label").to_pylist()
    pairs = {
        "old_old": (vectors["old", "queries"], vectors["old", "gallery"]),
        "new_old": (adapter.map(vectors["new", "queries"]), vectors["old", "gallery"]),
        "new_new": (vectors["new", "queries"], vectors["new", "gallery"]),
    }
    for pair, (q, g) in pairs.items():
        top1, mean_ap = brute_force(q, labels["queries"], g, labels["gallery"], report["k"])
        assert report[pair] == pytest.approx(top1, abs=1.5 / len(q)), pair  # one near-tie may flip
        assert report["map_at_k"][pair] == pytest.approx(mean_ap, abs=2e-3), pair


def test_serving_gate(models, gate):
    old_fp = load_artifact(models["old"])[1]["fingerprint"]
    new_fp = load_artifact(models["new"])[1]["fingerprint"]
    assert serving_gate(None, old_fp, old_fp) is None  # the same model: nothing to check
    with pytest.raises(CompatError, match="repforge compat check"):
        serving_gate(None, old_fp, new_fp)
    with pytest.raises(CompatError, match="fails the gate"):
        serving_gate(str(models["root"] / "report-new.json"), old_fp, new_fp)
    with pytest.raises(CompatError, match="is for index model"):
        serving_gate(str(models["root"] / "report-adapter.json"), new_fp, old_fp)
    allowed = serving_gate(str(models["root"] / "report-adapter.json"), old_fp, new_fp)
    assert allowed.adapter is not None and allowed.info()["new_old"] >= allowed.info()["old_old"]


def test_serving_refuses_the_pair_without_a_report_and_accepts_it_with_one(
    models, digits_data, gate, tmp_path
):
    """The app's argument check and the retriever (the plain class under the deployment)."""
    import asyncio

    from serve.args import ServeArgsError, resolve_args
    from serve.errors import VersionMismatch
    from serve.retriever import RetrieverDeployment
    from system.embed.batch import embeddings_metadata, embeddings_table
    from system.index import build_index

    gallery, queries = (pq.read_table(storage.parquet_files(uri))[: int(LIMIT)] for uri in digits_data)
    vectors, metas = {}, {}
    for side in ("old", "new"):
        model, metas[side] = load_artifact(models[side])
        with torch.inference_mode():
            vectors[side] = embed_images(
                model, metas[side]["preprocessing"], queries.column("image").to_pylist()
            )
            if side == "old":
                old_gallery = embed_images(
                    model, metas[side]["preprocessing"], gallery.column("image").to_pylist()
                )
    (tmp_path / "emb").mkdir()
    labels = gallery.column("label").to_pylist()
    table = embeddings_table(
        gallery.column("id").to_pylist(), old_gallery, {"label": labels}, embeddings_metadata(metas["old"])
    )
    pq.write_table(table, tmp_path / "emb" / "part-00000.parquet")
    index = str(tmp_path / "index")
    build_index(str(tmp_path / "emb"), index, progress=False)
    report = str(models["root"] / "report-adapter.json")
    with pytest.raises(ServeArgsError, match="built from model .* repforge compat check"):
        resolve_args({"model": models["new"], "index": index})
    with pytest.raises(ServeArgsError, match="fails the gate"):
        resolve_args(
            {"model": models["new"], "index": index, "compat": str(models["root"] / "report-new.json")}
        )
    assert resolve_args({"model": models["new"], "index": index, "compat": report})[0].compat == report

    new_fp, truth = metas["new"]["fingerprint"], np.array(queries.column("label").to_pylist())

    async def scenario():
        retriever = RetrieverDeployment.func_or_class(persist=False)
        with pytest.raises(VersionMismatch, match="repforge compat check"):
            await retriever.reconfigure({"model": models["new"], "index": index})
        await retriever.reconfigure({"model": models["old"], "index": index})
        await retriever.reconfigure({"model": models["new"], "index": index, "compat": report})  # model swap
        found = await retriever.search(vectors["new"], 1, new_fp)
        top1 = np.mean([row[0]["metadata"]["label"] for row in found["hits"]] == truth)
        info = (await retriever.info())["compat"]
        return top1, info

    top1, info = asyncio.run(scenario())
    saved = json.loads(storage.read_text(report))
    assert info["query_model"] == new_fp and info["new_old"] == saved["new_old"]
    assert top1 == pytest.approx(saved["new_old"], abs=0.01)  # the served answers are the report's


def test_upgrade_served_under_load(models, digits_data, gate, ray_local, tmp_path):
    """The README's upgrade on a running app, two clients in a bounded request loop throughout:
    old/old -> the new model through the adapter's report against the old index -> the gallery
    re-embedded with the new model (`repforge embed`) and indexed -> new/new. No request fails;
    each swap is seen by the fingerprints the answers carry."""
    from serve.control import start_app, stop_app, swap_versions
    from tests.conftest import free_port
    from tests.load_loop import run_under_load

    train_uri, test_uri = digits_data
    fingerprint = {side: load_artifact(models[side])[1]["fingerprint"] for side in ("old", "new")}

    def embed_and_index(side: str) -> str:
        emb, index = str(tmp_path / f"emb-{side}"), str(tmp_path / f"index-{side}")
        embedded = run_cli(
            "embed", "--model", models[side], "--data", train_uri, "--out", emb, "--limit", LIMIT
        )
        assert embedded == (0, emb)
        built = run_cli("index", "build", "--embeddings", emb, "--out", index, "--factory", "Flat")
        assert built == (0, index)
        return index

    queries = pq.read_table(storage.parquet_files(test_uri)).column("image").to_pylist()[:50]
    old_index = embed_and_index("old")
    url = start_app({"model": models["old"], "index": old_index, "replica_cpus": 0}, port=free_port())
    client = httpx.Client(base_url=url, timeout=60.0)
    try:
        report = str(models["root"] / "report-adapter.json")
        steps = {
            "compat": lambda: swap_versions(model=models["new"], compat=report),
            "new/new": lambda: swap_versions(index=embed_and_index("new")),  # re-indexed while serving
        }
        for step, action in steps.items():
            results = run_under_load(url, {}, queries, action, seconds=240.0)
            failed = [r for r in results if r[0] != 200]
            print(f"{step} swap: {len(results)} requests, {len(failed)} failed")
            assert not failed, failed[:5]
            assert results[-1][1] == fingerprint["new"]
            info = client.get("/v1/info").json()
            if step == "compat":
                assert {r[1] for r in results} == {fingerprint["old"], fingerprint["new"]}
                assert info["index"]["compat"]["new_old"] == gate["adapter"][2]["new_old"], info
            else:
                assert info["index"].get("compat") is None, info
        # new/new answers are the new model's: a gallery image finds itself.
        gallery = pq.read_table(storage.parquet_files(train_uri))
        image, item = gallery.column("image")[0].as_py(), gallery.column("id")[0].as_py()
        hits = client.post("/v1/search", files=[("image", ("0.png", image, "image/png"))], params={"k": 1})
        assert hits.json()["results"][0][0]["id"] == item
    finally:
        client.close()
        stop_app()


@pytest.mark.long  # Ray Train, 2 DDP workers: about 3 minutes on 2 cores (make test-long)
def test_compatible_training_under_ray_train_passes_the_gate(models, digits_data, ray_local, tmp_path):
    """`repforge pretrain` with objective.compatible_with on 2 DDP workers (prototypes summed
    across workers), then the gate."""
    from system.compat import run_check
    from system.train import run_training

    cfg = load_config(
        None,
        [
            f"data.train={digits_data[0]}",
            f"data.image_size={SIZE}",
            "data.hflip=false",
            "model.name=test_resnet",
            "objective.name=supervised",
            f"objective.compatible_with={models['old']}",
            "train.workers=2",
            "train.batch_size=32",
            f"train.max_steps={STEPS}",
            "train.lr=0.005",
            "train.cpus_per_worker=0.5",
            f"run.storage={tmp_path}",
            "run.name=bct",
            "seed=1",
        ],
    )
    model = run_training(cfg, "pretrain")["model"]
    _, report = run_check(
        models["old"], model, *digits_data, k=5, out_uri=str(tmp_path / "r.json"), limit=600
    )
    assert report["compatible"] and report["new_old"] >= report["old_old"], report
