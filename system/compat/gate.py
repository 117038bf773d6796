"""What serving asks before a model answers queries against an index of another model's embeddings.

`serving_gate(report_uri, index_fingerprint, model_fingerprint)`:
  - the same model (or an index without a fingerprint): None, nothing to check;
  - another model and no report, a report for another pair, or a failing report: CompatError
    whose one line says why and how to get a report;
  - otherwise a `Gate`: `gate.queries(vectors)` takes the new model's query vectors into the
    index's space (through the report's adapter, when it has one), `gate.info()` is what
    /v1/info shows (the pair and the report's figures).

    .venv/bin/python -m pytest -q tests/test_compat.py -k gate
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from system import storage
from system.compat.check import PAIRS
from system.compat.fit import Adapter, CompatError, load_adapter
from system.models.artifact import same_model

HOW = (
    "repforge compat check --old MODEL_{old} --new MODEL_{new} [--adapter DIR] --gallery DATA --queries DATA "
    "writes a report; serve with compat=REPORT (repforge serve --compat REPORT)"
)


@dataclass(frozen=True)
class Gate:
    """A passing report for (old index model, new query model), with its adapter if any."""

    report_uri: str
    report: dict
    adapter: Adapter | None

    @property
    def old(self) -> str:
        return self.report["old"]["fingerprint"]

    @property
    def new(self) -> str:
        return self.report["new"]["fingerprint"]

    def queries(self, vectors: np.ndarray) -> np.ndarray:
        return vectors if self.adapter is None else self.adapter.map(vectors)

    def info(self) -> dict:
        return {
            "report": self.report_uri,
            "index_model": self.old,
            "query_model": self.new,
            "adapter": self.report.get("adapter"),
            **{pair: self.report[pair] for pair in PAIRS},
            "map_at_k": self.report.get("map_at_k"),
            "k": self.report.get("k"),
            "compatible": self.report["compatible"],
        }


def read_report(uri: str) -> dict:
    try:
        report = json.loads(storage.read_text(storage.normalize(uri)))
        for key in ("old", "new", "compatible", *PAIRS):
            report[key]  # noqa: B018  (a KeyError says the file is not a report)
        return report
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompatError(
            f"compat: not a compatibility report: {uri} ({type(err).__name__}: {err})"
        ) from None


def serving_gate(report_uri: str | None, index_fingerprint: str | None, model_fingerprint: str | None):
    """None when no gate is needed, a Gate when the report allows the pair; else CompatError."""
    if same_model(index_fingerprint, model_fingerprint):
        return None
    refused = f"built from model {index_fingerprint}, but model {model_fingerprint} is served"
    how = HOW.format(old=index_fingerprint, new=model_fingerprint)
    if not report_uri:
        raise CompatError(f"{refused}; to serve it anyway, {how}")
    report = read_report(report_uri)
    pair = (report["old"].get("fingerprint"), report["new"].get("fingerprint"))
    if pair != (index_fingerprint, model_fingerprint):
        raise CompatError(f"{refused}; the report {report_uri} is for index model {pair[0]}, model {pair[1]}")
    if not report["compatible"]:
        raise CompatError(
            f"{refused}; the report {report_uri} fails the gate (new/old {report['new_old']:.4f} < "
            f"old/old {report['old_old']:.4f}): train compatibly or fit an adapter"
        )
    adapter = None
    if report.get("adapter"):
        adapter = load_adapter(report["adapter"]["uri"])
        if adapter.fingerprint != report["adapter"]["fingerprint"]:
            raise CompatError(f"{refused}; the adapter {adapter.uri} changed since the report was written")
    return Gate(storage.normalize(report_uri), report, adapter)
