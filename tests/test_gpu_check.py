"""bench/gpu_check.py cannot rot: its `--cpu --tiny` dry run (the same code paths as on a lent GPU, tiny
sizes) runs every part and writes the JSON and the BENCHMARKS rows; a failing part is recorded and the
next one still runs; the time budget skips what would start too late; missing packages install from
a wheel folder without the network."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_dry_run_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(out), "--budget-s", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert {k: p["status"] for k, p in report["parts"].items()} == {
        "attention": "ok", "model_step": "ok", "train_resume": "ok"}, report["parts"]
    assert report["packages"] == {"missing": []} and report["machine"]["device_type"] == "cpu"

    # a. bf16 against the fp32 reference: real (non-zero) bf16 errors, the stand-in backend within 2x SDPA's
    a = report["parts"]["attention"]["result"]
    assert a["compared"] == ["sdpa_block_diagonal"] and a["heads"] == [4, 2, 16]  # GQA: 4 query, 2 KV heads
    assert a["lens"] == [37, 20, 5, 1] and a["torch_varlen_gqa"] in ("enable_gqa", "repeated KV heads")
    for name in ("torch_varlen", "flash"):
        assert a["backends"][name]["skipped"].startswith("not usable on cpu")
    for name in ("sdpa", "sdpa_block_diagonal"):
        errs = a["backends"][name]["max_err"]
        assert set(errs) == {"out", "dq", "dk", "dv"} and all(0 < e < 0.05 for e in errs.values()), errs
    assert a["backends"]["sdpa_block_diagonal"]["passed"]

    # b. six settings measured, the compiled ones through NextDiT.compile_blocks
    b = report["parts"]["model_step"]["result"]
    assert [(r["activation_checkpointing"], r["compile"]) for r in b["configs"]] == [
        (ac, c) for c in (False, True) for ac in ("off", "every_2", "full")]
    assert all(r["ms_per_step"] > 0 and r["image_tokens_per_s"] > 0 for r in b["configs"]), b["configs"]
    assert b["image_tokens"] == 16 + 15 + 15 and b["flops_per_step"] > 0 and b["compile_backend"] == "aot_eager"
    assert b["peak_flops"] is None and all(r["mfu"] is None for r in b["configs"])  # no known CPU peak

    # c. killed after the step-4 checkpoint, resumed there, the uninterrupted run's losses and data
    c = report["parts"]["train_resume"]["result"]
    assert c["latest_at_kill"] == "step_0000004" and c["resumed_at"] == [4] and c["same_data"]
    assert c["losses_equal_after_resume"] and c["losses_resumed"] == c["losses_ref"] and len(c["losses_ref"]) == 8
    assert c["precision"] == {"module": ["bfloat16"], "master": ["float32"], "optimizer_states": ["float32"],
                              "grad_accum": "float32"}

    rows = out.with_suffix(".md").read_text()
    assert "| backend | out | dq | dk | dv |" in rows and "| sdpa_block_diagonal | " in rows
    assert rows.count("| off | ") == 2 and "| DeepSpeed bf16 run |" in rows and "| equal |" in rows


def test_a_failed_part_is_recorded_and_the_next_runs(tmp_path: Path) -> None:
    gc = load_gpu_check()
    report: dict = {"parts": {}}
    saved = []

    def boom(budget):
        raise RuntimeError("CUDA out of memory (simulated)")

    parts = [gc.Part("first", boom, 0), gc.Part("second", lambda b: {"value": 1}, 0),
             gc.Part("criteria", lambda b: {"passed": False}, 0), gc.Part("late", lambda b: {"value": 2}, 10_000)]
    gc.run_parts(parts, report, gc.Budget(60), lambda: saved.append(json.dumps(report)))
    first, second, criteria, late = (report["parts"][n] for n in ("first", "second", "criteria", "late"))
    assert first["status"] == "failed" and first["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "in boom" in first["traceback"]
    assert second == {"status": "ok", "result": {"value": 1}, "seconds": second["seconds"]}
    assert criteria["status"] == "failed" and "error" not in criteria
    assert late["status"] == "skipped" and late["reason"].startswith("budget: ") and "result" not in late
    assert len(saved) == 4  # the JSON is rewritten after every part: a killed check keeps what it had


def _wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel holding `module` (VALUE = 42)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{dist.replace('-', '_')}-0.1.dist-info"
    path = folder / f"{dist.replace('-', '_')}-0.1-py3-none-any.whl"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_missing_packages_install_from_the_wheel_folder_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gc = load_gpu_check()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    _wheel(wheels, "gpucheck-probe", "gpucheck_probe")
    wanted = {"gpucheck_probe": "gpucheck-probe", "json": "json-is-there"}
    got = gc.ensure_packages(wanted, wheels, site)
    assert got["missing"] == ["gpucheck-probe"] and got["returncode"] == 0, got
    assert got["still_missing"] == [] and "--no-index --find-links" in got["command"]
    import gpucheck_probe

    assert gpucheck_probe.VALUE == 42 and Path(gpucheck_probe.__file__).is_relative_to(site)
    assert str(site) in sys.path
    del sys.modules["gpucheck_probe"]
    # nothing left to install: no pip call at all
    assert gc.ensure_packages(wanted, wheels, site) == {"missing": []}
    # a distribution the folder lacks fails fast (no network is asked) and stays listed
    bad = gc.ensure_packages({"gpucheck_absent": "gpucheck-absent"}, wheels, site)
    assert bad["returncode"] != 0 and bad["still_missing"] == ["gpucheck-absent"]
