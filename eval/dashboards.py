"""python eval/dashboards.py --entity my-team --project lumina_illus --out dashboard.json

The W&B workspace of lumina_illus runs, defined as code (panels: loss, loss per t-bin, throughput and
MFU, data wait, stragglers, data health (skips per reason, shard failures, epoch, packing), character
recall vs samples seen, sample grids). By default only writes the
view specification to --out (works offline); --save creates the view in W&B (needs network and login).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.evaluation.dashboards import build_workspace, panel_metrics, workspace_spec  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entity", required=True, help="W&B entity (user or team)")
    ap.add_argument("--project", default="lumina_illus")
    ap.add_argument("--name", default="lumina_illus training", help="workspace (view) name")
    ap.add_argument("--out", default="dashboard.json", help="where the specification is written")
    ap.add_argument("--save", action="store_true", help="also create the workspace in W&B (online)")
    args = ap.parse_args(argv)
    ws = build_workspace(args.entity, args.project, args.name)
    spec = workspace_spec(ws)
    Path(args.out).write_text(json.dumps(spec, indent=2))
    for title, keys in panel_metrics(spec).items():
        print(f"{title:<60} {', '.join(keys)}")
    print(f"-> {args.out}")
    if args.save:
        ws.save()
        print(f"saved: {ws.url}")
    return spec


if __name__ == "__main__":
    main()
