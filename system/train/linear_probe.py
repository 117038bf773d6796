"""Closed-form linear probe: the `linear` fine-tune's head by ridge regression, no SGD.

    repforge finetune --config configs/quickstart.yaml \\
        --set finetune.method=linear --set finetune.closed_form=true

With the backbone frozen, the features the head sees never change, so the best linear
head under a squared loss on one-hot labels has a closed form: one pass over the
training data instead of epochs of SGD, and no learning rate to tune. Ray Data runs the
frozen backbone (the `model.init` artifact, or a fresh timm model seeded by `seed`) over
the data, in an actor pool on GPUs and as tasks on CPUs; the driver accumulates X^T X,
X^T Y, the feature sums and the class counts batch by batch, so its memory is
O(d^2 + d C) whatever the dataset size.
The head is solved on centred features (the bias comes from the means) for each ridge
strength in `finetune.ridge`; the best on `data.val` wins (its features are kept:
n_val x d). The run publishes what a `repforge finetune` run of method `linear` does:
`{run}/model`, `{run}/adapter`, `{run}/metrics.jsonl` and the confusion plot.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from system import storage
from system.config import JobConfig
from system.metrics import knn_accuracy, rankme, uniformity
from system.train.evaluate import confusion_counts


class RidgeStats:
    """Streaming sufficient statistics of a ridge regression of one-hot labels on features.

    Float64 throughout: X^T X of a few million rows in float32 loses the digits the
    centring (X^T X - n mu mu^T) needs.
    """

    def __init__(self, dim: int, num_classes: int):
        self.n = 0
        self.xtx = np.zeros((dim, dim))
        self.xty = np.zeros((dim, num_classes))
        self.sum_x = np.zeros(dim)
        self.counts = np.zeros(num_classes)

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        self.n += len(x)
        self.xtx += x.T @ x
        # X^T Y for one-hot Y: the feature sums per class, without building Y.
        np.add.at(self.xty.T, labels, x)
        self.sum_x += x.sum(0)
        self.counts += np.bincount(labels, minlength=self.counts.shape[0])


def solve_head(stats: RidgeStats, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight [C, d], bias [C]) minimising ||X W + b - Y||^2 + alpha ||W||^2, the bias unpenalised.

    alpha = ridge x n x the features' mean variance (trace of the covariance / d), so one
    grid of `ridge` values suits any feature scale and dataset size. Equals scikit-learn's
    Ridge(alpha=alpha, fit_intercept=True) on the one-hot labels.
    """
    n = stats.n
    mean_x, mean_y = stats.sum_x / n, stats.counts / n
    sxx = stats.xtx - n * np.outer(mean_x, mean_x)
    sxy = stats.xty - n * np.outer(mean_x, mean_y)
    alpha = ridge * max(np.trace(sxx) / len(mean_x), 1e-12)
    system = torch.from_numpy(sxx + alpha * np.eye(len(mean_x)))
    weight = torch.linalg.solve(system, torch.from_numpy(sxy)).numpy()  # [d, C]
    bias = mean_y - mean_x @ weight
    return weight.T.copy(), bias


def classification_report(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """val_acc, val_top5 and the confusion matrix (rows: true class), as the SGD path reports them."""
    predicted = logits.argmax(-1)
    top5 = np.argsort(-logits, axis=-1)[:, : min(5, num_classes)]
    confusion = confusion_counts(labels, predicted, num_classes)
    return {
        "val_acc": float((predicted == labels).mean()),
        "val_top5": float((top5 == labels[:, None]).any(-1).mean()),
        "confusion": confusion.tolist(),
    }


class FeatureActor:
    """The frozen backbone, loaded once (a Ray Data actor, or one per worker process: features_task);
    image bytes -> pooled features.

    The features are what the classification head sees (Embedder.classify = head(backbone(x))),
    not the L2-normalised embedding.
    """

    def __init__(self, timm_name: str, timm_kwargs: dict, state_ref: list, pre: dict):
        import ray

        from system.models.artifact import create_backbone

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = create_backbone(timm_name, timm_kwargs)
        # The ref arrives in a list so that Ray hands it over unresolved: fetched once, here.
        self.backbone.load_state_dict(ray.get(state_ref[0]))
        self.backbone.to(self.device).eval()
        self.pre = pre

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        from system.data.transforms import preprocess_batch

        images = torch.from_numpy(preprocess_batch(batch, self.pre, keep=())["image"]).to(self.device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            features = self.backbone(images).float().cpu().numpy()
        return {
            "features": features,
            "label": np.asarray(batch["label"], dtype=np.int64),
            "split": np.asarray(batch["split"], dtype=np.int8),
        }


def tag_split(batch: dict, split: int) -> dict:
    """For map_batches (fused into the read tasks): mark rows as training (0) or validation (1)."""
    return {**batch, "split": np.full(len(batch["label"]), split, dtype=np.int8)}


_WORKER_MODELS: dict[str, FeatureActor] = {}


def features_task(batch: dict, **actor_kwargs) -> dict:
    """For map_batches as tasks (CPU): one FeatureActor per worker process, reused across tasks.

    Tasks fuse with the read and run in Ray's pooled workers, which an earlier job has often
    warmed up (torch imported): no actor to start, as a CPU-only run's startup is most of it.
    """
    key = actor_kwargs["state_ref"][0].hex()
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = FeatureActor(**actor_kwargs)
    return _WORKER_MODELS[key](batch)


def embed_features(ds, actor_kwargs: dict, batch_size: int, concurrency: int):
    """(features, labels, split) batches of `ds`: an actor pool on GPUs, tasks on CPUs; prints progress."""
    import ray

    if ray.cluster_resources().get("GPU", 0):
        features = ds.map_batches(
            FeatureActor,
            fn_constructor_kwargs=actor_kwargs,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=1,
        )
    else:
        features = ds.map_batches(
            features_task, fn_kwargs=actor_kwargs, batch_size=batch_size, batch_format="numpy"
        )
    rows, start = 0, time.perf_counter()
    last = start
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        yield batch["features"], batch["label"], batch["split"]
        rows += len(batch["label"])
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            print(f"[linear_probe] embedded {rows} rows, {rows / (last - start):.0f} rows/s", flush=True)
    seconds = time.perf_counter() - start
    print(f"[linear_probe] embedded {rows} rows in {seconds:.1f}s, {rows / seconds:.0f} rows/s", flush=True)


def pick_ridge(stats: RidgeStats, ridges: list[float], val: tuple[np.ndarray, np.ndarray] | None):
    """(ridge, weight, bias, per-ridge val_acc): the best on val (ties: the stronger), else the middle."""
    if val is None:
        ridge = sorted(ridges)[len(ridges) // 2]
        return (ridge, *solve_head(stats, ridge), {})
    features, labels = val
    best, scores = None, {}
    for ridge in sorted(ridges, reverse=True):
        weight, bias = solve_head(stats, ridge)
        acc = float(((features @ weight.T + bias).argmax(-1) == labels).mean())
        scores[ridge] = acc
        if best is None or acc > best[0]:
            best = (acc, ridge, weight, bias)
    return (best[1], best[2], best[3], scores)


def probe_features(cfg: JobConfig, actor_kwargs: dict, dim: int, num_classes: int):
    """One pass of Ray Data over train (and val) rows: the training rows' ridge statistics, and
    the validation features and labels (None without data.val)."""
    import ray

    from system.data.dataset import read_dataset

    gpus = int(ray.cluster_resources().get("GPU", 0))
    concurrency = max(1, gpus) if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    ray.data.DataContext.get_current().enable_progress_bars = False
    batch = cfg.train.batch_size

    # Training and validation rows go through one pipeline (one model load per worker),
    # tagged so the driver can tell them apart.
    columns = ["image", "label"]
    ds = read_dataset(cfg.data.train, cfg.data.limit, columns=columns).map_batches(
        tag_split, fn_kwargs={"split": 0}
    )
    if cfg.data.val:
        ds = ds.union(
            read_dataset(cfg.data.val, columns=columns).map_batches(tag_split, fn_kwargs={"split": 1})
        )
    stats = RidgeStats(dim, num_classes)
    val_parts: list[tuple[np.ndarray, np.ndarray]] = []
    for features, labels, split in embed_features(ds, actor_kwargs, batch, concurrency):
        is_val = split == 1
        if is_val.any():
            val_parts.append((features[is_val], labels[is_val]))
        if not is_val.all():
            stats.add(features[~is_val], labels[~is_val])
    val = None
    if cfg.data.val:
        val = (np.concatenate([f for f, _ in val_parts]), np.concatenate([y for _, y in val_parts]))
    return stats, val


def run_linear_probe(cfg: JobConfig, plan: dict) -> dict[str, str]:
    """Fit and publish the closed-form linear head (cfg validated and made absolute by train.py)."""
    import ray.train

    from system.adapters.registry import parameter_report
    from system.train.evaluate import MAX_CONFUSION_CLASSES, per_class_report
    from system.train.export import export_artifacts, publish_result
    from system.train.module import build_model

    classes, meta, run_name = plan["classes"], plan["meta"], plan["run_name"]
    num_classes = len(classes)
    torch.manual_seed(cfg.seed)  # a fresh backbone: the same weights in every actor and the artifact
    module = build_model(cfg, "finetune", num_classes)  # backbone (model.init) frozen, head
    state_ref = ray.put({k: v.detach().cpu() for k, v in module.backbone.state_dict().items()})
    actor_kwargs = {
        "timm_name": cfg.model.name,
        "timm_kwargs": cfg.model.kwargs,
        "state_ref": [state_ref],
        "pre": meta["preprocessing"],
    }
    start = time.perf_counter()
    stats, val = probe_features(cfg, actor_kwargs, module.backbone.num_features, num_classes)
    ridge, weight, bias, scores = pick_ridge(stats, cfg.finetune.ridge, val)

    head = module.objective.head
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    params = parameter_report(module)  # the backbone is frozen: trainable = the head (all prefix heads)
    metrics = {
        "step": 0,
        "epoch": 1,
        "train_rows": stats.n,
        "ridge": ridge,
        "fit_time_s": time.perf_counter() - start,
        **params,
    }
    extra = {"closed_form": True, "method": "linear", "ridge_val_acc": {str(k): v for k, v in scores.items()}}
    if val is not None:
        features, labels = val
        report = classification_report(features @ weight.T + bias, labels, num_classes)
        confusion = report.pop("confusion")
        normalized = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=-1)
        metrics.update(report)
        metrics.update({"rankme": rankme(normalized), "val_uniformity": uniformity(normalized[:2048])})
        metrics["knn_acc"] = knn_accuracy(normalized, torch.from_numpy(labels), k=20)
        if num_classes <= MAX_CONFUSION_CLASSES:  # kept in model.json: bounded in size
            extra.update(per_class_report(confusion, classes))

    with tempfile.TemporaryDirectory() as tmp:
        full_meta = {**meta, "metrics": metrics, **extra, "job": "finetune"}
        export_artifacts(Path(tmp), module.state_dict(), cfg, "finetune", full_meta, num_classes)
        published = publish_result(
            SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(tmp)), cfg, "finetune", run_name
        )
    run_uri = storage.join(storage.normalize(cfg.run.storage), run_name)
    record = json.dumps({"time": time.time(), **metrics}, default=float) + "\n"
    storage.write_text(storage.join(run_uri, "metrics.jsonl"), record)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(
        "[finetune] closed-form linear done: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items()),
        flush=True,
    )
    return published
