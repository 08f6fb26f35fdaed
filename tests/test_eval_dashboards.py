"""The dashboard specification written offline: every logged metric has a panel, x = samples seen, and the
spec is a valid W&B view (it parses back through wandb-workspaces' own model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_illus.evaluation import metrics as M
from lumina_illus.evaluation.dashboards import CURVE_IMAGE, build_workspace, panel_metrics, workspace_spec

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dash") / "dashboard.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval/dashboards.py"), "--entity", "team", "--project", "proj",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_every_logged_metric_has_a_panel(spec):
    keys = {k for ks in panel_metrics(spec).values() for k in ks}
    assert set(M.ALL) - {M.SAMPLES_SEEN} <= keys  # samples seen is the x axis of every line plot
    from lumina_illus.data.reasons import SHARD_ERRORS, SKIP_REASONS

    assert {M.skipped_key(r) for r in SKIP_REASONS} | {M.shard_errors_key(r) for r in SHARD_ERRORS} <= keys
    assert CURVE_IMAGE in keys
    assert spec["entity"] == "team" and spec["project"] == "proj"


def test_panels_and_axes(spec):
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == ["Loss", "Loss per t-bin (t=0 noise, t=1 data)", "Throughput and MFU",
                                             "Data wait and stragglers", "Data", "Validation (held-out, fixed t and noise)",
                                             "Character recall", "Samples"]
    lines = [p for s in sections for p in s["panels"] if p["viewType"] == "Run History Line Plot"]
    assert lines and all(p["config"]["xAxis"] == M.SAMPLES_SEEN for p in lines)
    recall = [p for p in lines if p["config"]["metrics"] == [M.CHAR_RECALL]]
    assert len(recall) == 1
    media = [p for s in sections for p in s["panels"] if p["viewType"] == "Media Browser"]
    assert {k for p in media for k in p["config"]["mediaKeys"]} == {M.SAMPLE_GRID, CURVE_IMAGE}
    assert spec["spec"]["section"]["settings"]["xAxis"] == M.SAMPLES_SEEN


def test_spec_parses_back_as_a_wandb_view(spec):
    from wandb_workspaces.workspaces import Workspace, internal

    back = Workspace._from_model(internal.View.model_validate(spec))
    orig = build_workspace("team", "proj")
    assert [s.name for s in back.sections] == [s.name for s in orig.sections]
    assert [len(s.panels) for s in back.sections] == [len(s.panels) for s in orig.sections]
    assert panel_metrics(workspace_spec(back)) == panel_metrics(spec)


def test_loss_t_key():
    assert M.loss_t_key(0.0) == "train/loss_t0" and M.loss_t_key(0.37) == "train/loss_t3"
    assert M.loss_t_key(1.0) == "train/loss_t9"
    with pytest.raises(ValueError):
        M.loss_t_key(1.5)
