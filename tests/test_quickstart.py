"""The quickstart end to end: every stage for real on digits, with its promised quality."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow


def summary_value(stdout: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"no {name!r} line in the summary:\n{stdout[-3000:]}"
    return match.group(1).strip()


def test_quickstart_succeeds_with_promised_quality(quickstart_run):
    storage, done = quickstart_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # The last line of stdout is the URI of what the job wrote.
    assert done.stdout.strip().splitlines()[-1] == str(storage / "quickstart")
    assert float(summary_value(done.stdout, "fine-tuned accuracy (held-out digits)")) > 0.90
    assert float(summary_value(done.stdout, "index recall@10 vs exact")) == 1.0
    for endpoint in ("GET /v1/health", "POST /v1/embed", "POST /v1/classify", "POST /v1/search"):
        assert summary_value(done.stdout, f"latency {endpoint}").endswith(" ms")


def test_quickstart_artifacts_follow_the_contracts(quickstart_run):
    storage, done = quickstart_run
    assert done.returncode == 0
    base = storage / "quickstart"
    for stage in ("pretrain", "finetune"):
        meta = json.loads((base / stage / "model" / "model.json").read_text())
        assert meta["timm_name"] == "test_resnet" and meta["fingerprint"]
        assert (base / stage / "metrics.jsonl").read_text().strip()
    assert (base / "finetune" / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((base / "index" / "manifest.json").read_text())
    finetuned = json.loads((base / "finetune" / "model" / "model.json").read_text())
    assert manifest["fingerprint"] == finetuned["fingerprint"] and manifest["count"] == 1438
    leaderboard = (base / "sweep" / "leaderboard.csv").read_text().strip().splitlines()
    assert len(leaderboard) == 3 and "val_acc" in leaderboard[0]
    assert (base / "sweep" / "best.yaml").is_file()
