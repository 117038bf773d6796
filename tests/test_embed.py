"""Batch embedding with Ray Data equals the in-process forward, and keeps the contract."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from system import storage
from system.data.transforms import preprocessing_config
from system.embed.batch import embed_images, read_embeddings, run_embed
from system.models.artifact import Embedder, create_backbone, load_artifact, save_model


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    backbone = create_backbone("test_resnet", {})
    meta = {
        "timm_name": "test_resnet",
        "timm_kwargs": {},
        "preprocessing": preprocessing_config(backbone, 32),
    }
    uri = str(tmp_path_factory.mktemp("model") / "model")
    save_model(uri, Embedder(backbone), meta)
    return uri


def test_embed_matches_in_process_forward(ray_local, model_uri, digits_data, tmp_path):
    _, test_uri = digits_data
    out = run_embed(model_uri, test_uri, str(tmp_path / "emb"), batch_size=64, concurrency=1)
    ids, vectors, rest, meta = read_embeddings(out)
    source = pq.read_table(storage.parquet_files(test_uri)[0])
    assert sorted(ids) == sorted(source.column("id").to_pylist())
    assert "image" not in rest.column_names and "label" in rest.column_names
    model, model_meta = load_artifact(model_uri)
    assert meta["fingerprint"] == model_meta["fingerprint"] and meta["normalized"] == "true"
    assert meta["classes"] == ",".join(str(i) for i in range(10))
    order = {row_id: i for i, row_id in enumerate(source.column("id").to_pylist())}
    expected = embed_images(model, model_meta["preprocessing"], source.column("image").to_pylist())
    got = vectors[np.argsort([order[i] for i in ids])]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    labels = dict(zip(source.column("id").to_pylist(), source.column("label").to_pylist()))
    assert rest.column("label").to_pylist() == [labels[i] for i in ids]


def test_embed_refuses_existing_output(model_uri, digits_data, tmp_path):
    (tmp_path / "emb").mkdir()
    with pytest.raises(storage.StorageError, match="output exists"):
        run_embed(model_uri, digits_data[1], str(tmp_path / "emb"))


def test_embed_resumes_after_crash(ray_local, digits_data, tmp_path, monkeypatch, capsys):
    """A crash after the first shard is written; the re-run skips it and embeds only the rest."""
    import system.embed.batch as embed

    backbone = create_backbone("test_resnet", {})
    meta = {
        "timm_name": "test_resnet",
        "timm_kwargs": {},
        "preprocessing": preprocessing_config(backbone, 32),
        "matryoshka_dims": [16, 32],
    }
    model_uri = str(tmp_path / "model")
    save_model(model_uri, Embedder(backbone), meta)
    source = pq.read_table(storage.parquet_files(digits_data[1])[0])
    data = tmp_path / "data"
    data.mkdir()
    for n, part in enumerate((source.slice(0, 150), source.slice(150))):  # two input files
        pq.write_table(part, data / f"part-{n:05d}.parquet")

    write_shard = embed._write_shard

    def crash_after_first(*args):
        write_shard(*args)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(embed, "_write_shard", crash_after_first)
    out = tmp_path / "emb"
    with pytest.raises(KeyboardInterrupt):
        run_embed(model_uri, str(data), str(out), batch_size=64, concurrency=1)
    assert not out.exists()
    partial = tmp_path / ".emb.partial"
    (written,) = partial.glob("part-*.parquet")
    kept = written.read_bytes()
    monkeypatch.setattr(embed, "_write_shard", write_shard)

    run_embed(model_uri, str(data), str(out), batch_size=64, concurrency=1)
    assert "resuming, 1 shards" in capsys.readouterr().out and not partial.exists()
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert (out / written.name).read_bytes() == kept  # skipped, not embedded again
    ids, vectors, _, emb_meta = read_embeddings(str(out))
    assert emb_meta["matryoshka_dims"] == "16,32" and sorted(ids) == sorted(source.column("id").to_pylist())
    model, model_meta = load_artifact(model_uri)
    order = {row_id: i for i, row_id in enumerate(source.column("id").to_pylist())}
    expected = embed_images(model, model_meta["preprocessing"], source.column("image").to_pylist())
    np.testing.assert_allclose(vectors[np.argsort([order[i] for i in ids])], expected, atol=1e-5)
