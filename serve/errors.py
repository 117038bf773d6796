"""Errors raised inside the serve deployments and turned into JSON errors by the ingress.

.venv/bin/python -m pytest -q tests/test_serve.py -k bad_input
"""

from __future__ import annotations


class VersionMismatch(ValueError):
    """Vectors from one model met an index (or prototypes) built from another; retry after a swap."""


class InvalidImage(ValueError):
    """A posted image whose header reads but whose payload does not decode (truncated, corrupt)."""


class PrefixDimError(ValueError):
    """A Matryoshka `dim` the index cannot search with (not trained, or not an inner-product index)."""


class UnknownItem(LookupError):
    """An item id the index does not hold (or one whose image is not stored)."""
