"""W&B workspace for lumina_illus runs, defined as code (wandb-workspaces).

Sections: loss, loss per t-bin, throughput and MFU, data wait and stragglers, data health (samples
skipped per reason, shard read failures, epoch, packing), character recall vs samples seen, sample
grids. Every metric name comes from `lumina_illus.evaluation.metrics`, the same
constants the trainer logs with. Offline, `workspace_spec()` gives the view specification as plain JSON
(what `Workspace.save()` would send); online, `eval/dashboards.py --save` creates the view.
"""

from __future__ import annotations

from typing import Any

from lumina_illus.data.reasons import SHARD_ERRORS, SKIP_REASONS
from lumina_illus.evaluation import metrics as M

CURVE_IMAGE = "eval/char_recall_curve"  # PNG logged by eval/char_recall.py (curves.log_curves_wandb)


def build_workspace(entity: str, project: str, name: str = "lumina_illus training") -> Any:
    """The workspace object (wandb_workspaces.workspaces.Workspace); x axis = image samples seen, so
    runs with different batch sizes and families line up."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def line(title: str, ys: list[str], log_y: bool = False) -> Any:
        return wr.LinePlot(title=title, x=M.SAMPLES_SEEN, y=ys, log_y=log_y or None, title_x="image samples seen")

    sections = [
        ws.Section(name="Loss", is_open=True, panels=[
            line("loss", [M.LOSS]), line("grad norm", [M.GRAD_NORM], log_y=True), line("learning rate", [M.LR]),
            line("skipped steps (non-finite)", [M.SKIPPED_STEPS]),
        ]),
        ws.Section(name="Loss per t-bin (t=0 noise, t=1 data)", is_open=True, panels=[
            line("loss per t-bin", list(M.LOSS_T)),
            *[line(f"loss t in [{i / M.LOSS_T_BINS:.1f}, {(i + 1) / M.LOSS_T_BINS:.1f})", [k])
              for i, k in enumerate(M.LOSS_T)],
        ]),
        ws.Section(name="Throughput and MFU", is_open=True, panels=[
            line("images / s", [M.IMAGES_PER_S]), line("image tokens / s", [M.TOKENS_PER_S]), line("MFU", [M.MFU]),
            line("peak memory (GiB)", [M.MEM_GB]),
        ]),
        ws.Section(name="Data wait and stragglers", is_open=True, panels=[
            line("share of step waiting for data", [M.DATA_WAIT_FRAC]),
            line("step time spread across ranks (stragglers)", [M.STEP_TIME_SPREAD]),
        ]),
        ws.Section(name="Data", is_open=True, panels=[
            line("samples skipped or lost (all reasons, cumulative)", [M.DATA_SKIPPED]),
            line("bad share of the recent window (stops above data.max_skip_fraction)", [M.DATA_SKIP_FRACTION]),
            line("samples skipped per reason", [M.skipped_key(r) for r in SKIP_REASONS]),
            line("shard reads failed (after retries)", [M.DATA_SHARD_ERRORS]),
            line("shard reads failed per reason", [M.shard_errors_key(r) for r in SHARD_ERRORS]),
            line("epoch", [M.DATA_EPOCH]), line("samples per epoch (manifests)", [M.DATA_SAMPLES_PER_EPOCH]),
            line("packing efficiency (image tokens / budget)", [M.DATA_PACKING]),
            line("image tokens per micro-batch", [M.DATA_TOKENS_PER_MICRO]),
        ]),
        ws.Section(name="Validation (held-out, fixed t and noise)", is_open=True, panels=[
            line("validation loss", [M.VAL_LOSS]), line("validation loss per t-bin", list(M.VAL_LOSS_T)),
            line("held-out samples evaluated / unreadable", [M.VAL_SAMPLES, M.VAL_SKIPPED]),
        ]),
        ws.Section(name="Character recall", is_open=True, panels=[
            line("character recall vs image samples seen", [M.CHAR_RECALL]),
            wr.MediaBrowser(title="recall curve (eval/char_recall.py)", media_keys=[CURVE_IMAGE]),
        ]),
        ws.Section(name="Samples", is_open=True, panels=[
            wr.MediaBrowser(title="sample grid", media_keys=[M.SAMPLE_GRID], gallery_axis="step"),
        ]),
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=M.SAMPLES_SEEN))


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """The view specification as plain JSON-able data (camelCase keys, as W&B stores it)."""
    import json

    return json.loads(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True))


def panel_metrics(spec: dict[str, Any]) -> dict[str, list[str]]:
    """{panel title: metric/media keys} of a spec, for checks and for printing."""
    out = {}
    for sec in spec["spec"]["section"]["panelBankConfig"]["sections"]:
        for p in sec["panels"]:
            cfg = p["config"]
            out[f"{sec['name']} / {cfg.get('chartTitle')}"] = cfg.get("metrics") or cfg.get("mediaKeys") or []
    return out
