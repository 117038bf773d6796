"""Maps from a new model's embedding space into an old one's (Drift-Adapter style), and their choice.

Three kinds, fitted on paired embeddings of the same images (new -> old):

    procrustes   x @ W, W (semi-)orthogonal: the rotation that best aligns the two spaces
    affine       x @ W + b by ridge regression, full rank or low rank (reduced-rank regression)
    mlp          x @ W + b + MLP(x): a residual two-layer MLP on top of the affine map

A map is a dict of float32 numpy arrays (what the artifact's safetensors file holds) plus
its kind; `apply_map` is plain numpy so a serving replica needs nothing more. The kind is
picked by held-out cross-model retrieval: each held-out image's mapped new vector must
find its own old vector among all held-out old vectors (top-1).

    .venv/bin/python -m pytest -q tests/test_compat.py -k maps
"""

from __future__ import annotations

import numpy as np

KINDS = ("procrustes", "affine", "lowrank", "mlp")
RIDGE = 1e-3  # x n x mean feature variance: enough to keep the solve stable on collinear features
MLP_HIDDEN = 256
MLP_STEPS = 400


class MapError(ValueError):
    """A user error about a map: the message is one line."""


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def apply_map(params: dict[str, np.ndarray], x: np.ndarray, normalize: bool) -> np.ndarray:
    """New-space vectors [n, d_new] -> old-space vectors [n, d_old] (L2-normalised when `normalize`)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != params["weight"].shape[0]:
        raise MapError(f"vectors: {x.shape[-1]} dims; this map takes {params['weight'].shape[0]}")
    y = x @ params["weight"] + params["bias"]
    if "fc1.weight" in params:
        hidden = x @ params["fc1.weight"] + params["fc1.bias"]
        hidden = 0.5 * hidden * (1.0 + np.tanh(0.7978845608 * (hidden + 0.044715 * hidden**3)))  # GELU
        y = y + hidden @ params["fc2.weight"] + params["fc2.bias"]
    y = y.astype(np.float32, copy=False)
    return _normalize(y) if normalize else y


def fit_procrustes(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """argmin ||x W - y|| over W with orthonormal rows or columns (SVD of x^T y)."""
    u, _, vt = np.linalg.svd(x.T.astype(np.float64) @ y, full_matrices=False)
    return {"weight": (u @ vt).astype(np.float32), "bias": np.zeros(y.shape[1], np.float32)}


def fit_affine(x: np.ndarray, y: np.ndarray, rank: int | None = None) -> dict[str, np.ndarray]:
    """Ridge regression y ~ x W + b; with `rank`, reduced to that rank (projection of the fitted
    values on their top `rank` principal directions, Izenman's reduced-rank regression)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    lam = RIDGE * len(x) * max(float(xc.var(0).mean()), 1e-12)
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    if rank is not None and rank < min(w.shape):
        _, _, vt = np.linalg.svd(xc @ w, full_matrices=False)
        w = w @ vt[:rank].T @ vt[:rank]
    return {"weight": w.astype(np.float32), "bias": (my - mx @ w).astype(np.float32)}


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The affine map plus a residual MLP trained on the cosine loss (the last layer starts at
    zero, so training starts from the affine fit and can only improve the training loss)."""
    import torch
    from torch import nn

    base = fit_affine(x, y)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(x.shape[1], MLP_HIDDEN), nn.Linear(MLP_HIDDEN, y.shape[1])
    nn.init.zeros_(fc2.weight)
    nn.init.zeros_(fc2.bias)
    weight, bias = (torch.from_numpy(base[k]) for k in ("weight", "bias"))
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(_normalize(y))
    optimizer = torch.optim.AdamW([*fc1.parameters(), *fc2.parameters()], lr=3e-3, weight_decay=1e-4)
    batch = min(len(x), 4096)
    for _ in range(MLP_STEPS):
        rows = torch.randint(0, len(x), (batch,), generator=generator)
        out = xt[rows] @ weight + bias + fc2(nn.functional.gelu(fc1(xt[rows]), approximate="tanh"))
        loss = (1 - (nn.functional.normalize(out, dim=-1) * yt[rows]).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(base)
    for name, layer in (("fc1", fc1), ("fc2", fc2)):
        params[f"{name}.weight"] = layer.weight.detach().T.contiguous().numpy()
        params[f"{name}.bias"] = layer.bias.detach().numpy()
    return params


def fit_map(kind: str, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    if kind == "procrustes":
        return fit_procrustes(x, y)
    if kind == "affine":
        return fit_affine(x, y)
    if kind == "lowrank":
        return fit_affine(x, y, rank=max(1, min(x.shape[1], y.shape[1]) // 4))
    if kind == "mlp":
        return fit_mlp(x, y)
    raise MapError(f"kind: unknown map kind {kind!r} (known: {', '.join(KINDS)})")


def self_recall(mapped: np.ndarray, old: np.ndarray) -> float:
    """Share of rows whose mapped new vector is nearest (cosine) to its own old vector."""
    scores = _normalize(mapped) @ _normalize(old).T
    return float((scores.argmax(1) == np.arange(len(old))).mean())


def choose_map(
    x: np.ndarray, y: np.ndarray, kinds=KINDS, normalize: bool = True, heldout: float = 0.2, seed: int = 0
) -> tuple[str, dict[str, np.ndarray], dict[str, float]]:
    """Fit each kind on (1 - heldout) of the pairs, score it on the rest (self_recall), refit the
    best on all pairs. Returns (kind, params, {kind: held-out top-1})."""
    if len(x) != len(y) or len(x) < 10:
        raise MapError(f"data: need at least 10 paired embeddings to fit a map, got {min(len(x), len(y))}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise MapError(
            f"kinds: unknown map kind {unknown[0] if unknown else ''!r} (known: {', '.join(KINDS)})"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(len(x) * heldout))
    test, train = order[:cut], order[cut:]
    scores = {}
    for kind in kinds:
        params = fit_map(kind, x[train], y[train])
        scores[kind] = self_recall(apply_map(params, x[test], normalize), y[test])
    # Ties go to the simpler map (KINDS is in order of size).
    best = max(kinds, key=lambda k: (scores[k], -KINDS.index(k)))
    return best, fit_map(best, x, y), scores
