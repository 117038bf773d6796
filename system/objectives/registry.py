"""Training objectives, one file each, registered by name.

An objective is an nn.Module holding its own heads (projection, classifier, decoder),
built as `cls(embed_dim, objective_cfg, num_classes, backbone=backbone)`; its
`forward(backbone, batch)` returns the scalar loss for the local batch and a dict of
extra metrics. What it needs is declared where it is registered, never special-cased
elsewhere: its options (a system.options.Options model; config.py makes them
`objective.<option>` keys), the views a batch carries (1: `image`; 2: `view1`, `view2`,
augmented) and whether it needs labels (`label`). Adding one: a new file with
`@register_objective("name", options=..., views=..., labels=...)`, its name in the import
line of system/objectives/__init__.py, one row in tests/test_objectives.py.

    .venv/bin/python -m pytest -q tests/test_objectives.py -k "registry or matryoshka"
"""

from __future__ import annotations

from torch import nn

OBJECTIVES: dict[str, type] = {}


def register_objective(name: str, *, options: type | None = None, views: int = 1, labels: bool = False):
    """Class decorator: `OBJECTIVES[name] = cls`, with what it declares as class attributes."""
    if views not in (1, 2):
        raise ValueError(f"objective {name!r}: views is 1 (image) or 2 (view1, view2), not {views}")

    def add(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        OBJECTIVES[name] = cls
        cls.name, cls.options, cls.views, cls.labels = name, options, views, labels
        return cls

    return add


def get_objective(name: str) -> type:
    if name not in OBJECTIVES:
        raise ValueError(
            f"objective.name: unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})"
        )
    return OBJECTIVES[name]


def nested_dims(cfg, embed_dim: int) -> list[int]:
    """Matryoshka prefixes to train, ending with the full embedding (`objective.matryoshka_dims`)."""
    too_big = [d for d in cfg.matryoshka_dims if d > embed_dim]
    if too_big:
        raise ValueError(
            f"objective.matryoshka_dims: {too_big[0]} is larger than the model's embedding ({embed_dim})"
        )
    return [d for d in cfg.matryoshka_dims if d < embed_dim] + [embed_dim]


class PrefixHeads(nn.Module):
    """One head per nested prefix of the embedding (Matryoshka, Kusupati et al., 2022).

    `make_head(d)` builds the head for a d-dimensional prefix. Summing the objective over
    prefixes trains every prefix to be an embedding on its own; with no Matryoshka dims
    there is one head, on the full embedding.
    """

    def __init__(self, dims: list[int], make_head):
        super().__init__()
        self.dims = dims
        self.heads = nn.ModuleList(make_head(d) for d in dims)

    def forward(self, embedding):
        return [(d, head(embedding[:, :d])) for d, head in zip(self.dims, self.heads)]


def sum_over_prefixes(terms: list[tuple[int, object]], extra: dict):
    """Total loss = sum of the per-prefix losses; each term is also reported (`loss_d{dim}`)."""
    if len(terms) > 1:
        extra.update({f"loss_d{d}": loss.detach() for d, loss in terms})
    return sum(loss for _, loss in terms), extra
