"""python bench/gpu_check.py --out gpu_check.json [--wheels wheels] [--budget-s 480]
python bench/gpu_check.py --cpu --tiny --out /tmp/gpu_check.json     # the CI dry run (tests/test_gpu_check.py)

One prepared check for a lent single-GPU H100/H200 machine with PyTorch + CUDA and no network. It
writes one JSON (--out) and, beside it, the same name with `.md`: rows ready for BENCHMARKS.md.
Three parts, each guarded (a failure is recorded with its traceback and the next part still runs),
all inside one time budget (--budget-s; a part or setting that would start too late is recorded as
skipped):

 a. attention: `torch_varlen` (and flash-attn where installed) against padded SDPA in bf16, forward
    and backward, on a pack of mixed sequence lengths with GQA (24 query / 8 KV heads, head dim 96).
    Each backend's max error on out, dq, dk, dv against an fp32 reference must stay within 2x SDPA-bf16's
    own error (+1e-3, flash-attn's test rule); forward and forward+backward ms are timed.
 b. model_step: the 2.6B NextDiT forward+backward in bf16 on one packed 1024^2-class micro-batch (what
    configs/lu2b_768.yaml packs: 1024^2, 832x1216, 1216x832, 1024^2 with 256/180/120/60 caption
    tokens): ms/step, image tokens/s, MFU (NextDiT.flops x 3 / time / peak; the peak used is named in
    the JSON: --peak-tflops, else lumina_illus.train.telemetry.PEAK_FLOPS by device name, H100/H200
    989 dense bf16), peak memory, for activation checkpointing off / every_2 / full, compile off / on.
 c. train_resume: 30 steps of a 1-GPU DeepSpeed bf16 training (ZeRO-2, selective checkpointing, EMA)
    of a mid-size NextDiT (dim 1152, 12/4 heads, 6 layers + refiners) on generated 256x256 shards
    (lumina_illus.train.tiny_run), another run SIGKILLed after its step-15 checkpoint and resumed:
    same data every step, and the losses after the resume equal the uninterrupted run's (exactly,
    or within the run-to-run difference of steps 1-15 where CUDA kernels are not deterministic).

--cpu --tiny runs the same code paths with tiny sizes on the CPU (torch_varlen and flash-attn have
no CPU kernel: the block-diagonal SDPA formulation stands in as the compared backend; compile uses
the aot_eager backend unless --compile-backend says otherwise).

Taking the Python packages along. An image with only PyTorch lacks DeepSpeed, diffusers, webdataset
and a few of their requirements (bench/gpu_wheels.txt lists them with the versions tested here).
On a machine with the package registry, from the repository root:

    mkdir -p wheels && echo /wheels/ >> .git/info/exclude
    # DeepSpeed ships only a source archive: build its pure-Python wheel (ops are JIT-built), no torch pulled
    python -m pip wheel --no-deps -w wheels deepspeed==0.19.8
    python -m pip download --no-deps --only-binary=:all: -d wheels -r bench/gpu_wheels.txt \
        --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

(11 MB; `--no-deps` keeps pip from pulling another torch.) Take `wheels/` along inside the checkout.
On the GPU machine this script installs whatever it cannot import from that folder, without network:

    python -m pip install --no-index --find-links wheels/ deepspeed diffusers ...

(into the running environment, or with --site DIR into DIR, which is then put on sys.path and
PYTHONPATH). The JSON records what was missing and what pip said. A full run on the GPU machine:

    python bench/gpu_check.py --out results/gpu_check.json --work /tmp/gpu_check --site /tmp/site

(--work holds the generated shards and checkpoints, a few GB: keep it out of folders copied back.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# module the check imports -> distribution to install from the wheel folder when the import fails
NEEDED = {"deepspeed": "deepspeed", "diffusers": "diffusers", "transformers": "transformers",
          "tokenizers": "tokenizers", "safetensors": "safetensors", "webdataset": "webdataset",
          "braceexpand": "braceexpand", "yaml": "pyyaml", "PIL": "pillow", "numpy": "numpy", "tqdm": "tqdm"}
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# packages from a wheel folder


def missing_modules(modules: dict[str, str]) -> list[str]:
    """Distributions (values of `modules`) whose module cannot be found."""
    return [dist for mod, dist in modules.items() if importlib.util.find_spec(mod) is None]


def ensure_packages(modules: dict[str, str], wheels: Path, site: Path | None) -> dict[str, Any]:
    """Install the distributions of `modules` ({module: distribution}) that cannot be imported with
    `pip install --no-index --find-links wheels/ DISTS` (never the network); with `site`, into that
    folder, put first on sys.path and PYTHONPATH (the training runs of part c inherit it)."""
    missing = missing_modules(modules)
    if not missing:
        return {"missing": []}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *missing]
    if site is not None:
        cmd[4:4] = ["--target", str(site)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if site is not None:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return {"missing": missing, "command": " ".join(cmd), "returncode": done.returncode,
            "still_missing": missing_modules({m: d for m, d in modules.items() if d in missing}),
            "pip_tail": (done.stdout + done.stderr)[-3000:]}


# ---------------------------------------------------------------------------------------------
# the guarded runner


class Budget:
    """Seconds left of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Part:
    name: str
    fn: Callable[[Budget], dict[str, Any]]  # -> result (JSON-able), raises on failure
    min_s: float  # do not start with less time than this left


def run_parts(parts: list[Part], report: dict[str, Any], budget: Budget, save: Callable[[], None]) -> None:
    """Run each part in order: {"status": ok | failed | skipped, "seconds", "result" | "error"} in
    report["parts"][name], saved after each part; a failure never stops the next part."""
    for part in parts:
        entry: dict[str, Any] = {"status": "skipped"}
        report["parts"][part.name] = entry
        if budget.left() < part.min_s:
            entry["reason"] = f"budget: {budget.left():.0f}s left, the part needs >= {part.min_s:.0f}s"
            save()
            continue
        t0 = time.perf_counter()
        try:
            entry["result"] = part.fn(budget)
            entry.pop("partial", None)
            entry["status"] = "ok" if entry["result"].get("passed", True) else "failed"
        except Exception as e:  # noqa: BLE001 - recorded, the next part runs
            entry.update(status="failed", error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        _free_accelerator()
        save()


def _free_accelerator() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# sizes


@dataclass
class Sizes:
    attn_lens: list[int]  # sequence lengths of the attention pack
    heads: tuple[int, int, int]  # query heads, KV heads, head dim
    attn_iters: int
    latents: list[tuple[int, int]]  # (h, w) latent sizes of the model-step pack
    captions: list[int]  # caption tokens per sample
    warmup: int
    iters: int
    train_size: int  # image side of the training shards
    train_images: int  # images in them (an epoch)
    train_arch: dict[str, Any]
    train_batch: tuple[int, int, int]  # global batch, micro batch, grad accum (1 rank)
    train_steps: int
    ckpt_every: int


FULL = Sizes(
    attn_lens=[4160, 4096, 1536, 300, 77, 1], heads=(24, 8, 96), attn_iters=10,
    latents=[(128, 128), (104, 152), (152, 104), (128, 128)], captions=[256, 180, 120, 60], warmup=2, iters=5,
    train_size=256, train_images=48, train_arch={"preset": "2b", "dim": 1152, "n_heads": 12, "n_kv_heads": 4, "n_layers": 6,
                                "cap_feat_dim": 32},
    train_batch=(8, 4, 2), train_steps=30, ckpt_every=15,
)
TINY = Sizes(
    attn_lens=[37, 20, 5, 1], heads=(4, 2, 16), attn_iters=2,
    latents=[(8, 8), (6, 10), (10, 6)], captions=[5, 3, 4], warmup=1, iters=2,
    # 6 images, 2 per step: epochs end at steps 3 and 6, the resume (step 4) starts in the second
    train_size=64, train_images=6, train_arch={"preset": "tiny"}, train_batch=(2, 1, 2), train_steps=8, ckpt_every=4,
)


@dataclass
class Ctx:
    device: Any  # torch.device
    sizes: Sizes
    work: Path  # scratch folder (shards, runs)
    compile_backend: str
    peak_flops: float | None
    peak_source: str
    compile_estimate_s: float  # time the first compiled step may take
    partial: Callable[[str, dict[str, Any]], None] = field(default=lambda name, data: None)  # save progress


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable[[], Any], iters: int, device: Any) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters * 1e3


# ---------------------------------------------------------------------------------------------
# a. attention numerics


def part_attention(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    import torch

    from lumina_illus.models import attention as A

    dev, s = ctx.device, ctx.sizes
    h, hkv, hd = s.heads
    n = sum(s.attn_lens)
    cu = torch.tensor([0, *torch.tensor(s.attn_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    max_len = max(s.attn_lens)
    g = torch.Generator().manual_seed(0)
    q32, k32, v32, do32 = (torch.randn(n, heads, hd, generator=g).to(dev) for heads in (h, hkv, hkv, h))
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not TF32

    def sdpa(backend: str) -> Callable[..., Any]:
        return lambda q, k, v: A.varlen_attention(q, k, v, cu, max_len, backend)

    ref = _attention_grads(sdpa("sdpa"), (q32, k32, v32, do32), torch.float32)
    candidates = {"sdpa": sdpa("sdpa"), "torch_varlen": sdpa("torch_varlen"), "flash": sdpa("flash"),
                  "sdpa_block_diagonal": lambda q, k, v: A.sdpa_block_diagonal(q, k, v, cu)}
    results: dict[str, Any] = {}
    for name, fn in candidates.items():
        if name in ("torch_varlen", "flash") and not A.backend_usable(name, dev, torch.bfloat16):
            results[name] = {"skipped": f"not usable on {dev.type} (installed: "
                                        f"{A._KERNELS[name]() is not None})"}
            continue
        if name == "sdpa_block_diagonal" and n > 4096:
            results[name] = {"skipped": f"an ({n}, {n}) mask: only for small packs"}
            continue
        got = _attention_grads(fn, (q32, k32, v32, do32), torch.bfloat16)
        errs = [float((a - b).abs().max()) for a, b in zip(got, ref)]
        fwd, fwd_bwd = _attention_ms(fn, (q32, k32, v32, do32), s.attn_iters, dev)
        results[name] = {"max_err": dict(zip(("out", "dq", "dk", "dv"), errs)), "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
    base = results["sdpa"]["max_err"]
    compared = [k for k, r in results.items() if k != "sdpa" and "max_err" in r]
    for name in compared:
        r = results[name]
        r["err_vs_sdpa_bf16"] = {t: r["max_err"][t] / max(base[t], 1e-12) for t in base}
        r["passed"] = all(r["max_err"][t] <= 2 * base[t] + 1e-3 for t in base)
    gqa = "enable_gqa" if "enable_gqa" in A.TORCH_VARLEN_PARAMS else "repeated KV heads"
    return {"tokens": n, "lens": s.attn_lens, "heads": [h, hkv, hd], "dtype": "bfloat16", "reference": "SDPA fp32",
            "torch_varlen_gqa": gqa, "backends": results, "compared": compared,
            "passed": bool(compared) and all(results[k]["passed"] for k in compared)}


def _attention_grads(fn: Callable[..., Any], qkvd: tuple[Any, ...], dtype: Any) -> list[Any]:
    """[out, dq, dk, dv] in fp32 of `fn` run on q, k, v cast to `dtype`, backward from do."""
    q, k, v = (x.detach().to(dtype).clone().requires_grad_() for x in qkvd[:3])
    out = fn(q, k, v)  # (N, H, hd)
    out.backward(qkvd[3].to(dtype))
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _attention_ms(fn: Callable[..., Any], qkvd: tuple[Any, ...], iters: int, device: Any) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of `fn` in bf16."""
    import torch

    q, k, v = (x.detach().to(torch.bfloat16).clone().requires_grad_() for x in qkvd[:3])
    do = qkvd[3].to(torch.bfloat16)
    with torch.no_grad():
        fwd = _timed_ms(lambda: fn(q, k, v), iters, device)
    return fwd, _timed_ms(lambda: fn(q, k, v).backward(do), iters, device)


# ---------------------------------------------------------------------------------------------
# b. model forward + backward


def part_model_step(ctx: Ctx, budget: Budget, reserve_s: float) -> dict[str, Any]:
    import torch

    from lumina_illus.models.attention import resolve_backend
    from lumina_illus.models.nextdit import NextDiT, nextdit_2b, nextdit_tiny

    dev, s, bf16 = ctx.device, ctx.sizes, torch.bfloat16
    cfg = nextdit_tiny() if s is TINY else nextdit_2b()
    backend = resolve_backend("auto", dev, bf16)
    with torch.device(dev):
        model = NextDiT(cfg)
    model.to(bf16).set_attention_backend(backend)
    with torch.no_grad():  # move the zero-initialised adaLN / final layers off zero
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(cfg.in_channels, hh, ww, generator=g).to(dev, bf16) for hh, ww in s.latents]
    n_cap = max(s.captions)
    feats = torch.randn(len(s.captions), n_cap, cfg.cap_feat_dim, generator=g).to(dev, bf16)  # (B, L, D)
    mask = (torch.arange(n_cap)[None] < torch.tensor(s.captions)[:, None]).to(dev)  # (B, L)
    t = torch.rand(len(s.captions), generator=g).to(dev)
    img_tokens = [hh * ww // cfg.patch_size**2 for hh, ww in s.latents]
    flops = 3 * sum(model.flops(i, c) for i, c in zip(img_tokens, s.captions))  # forward + backward

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(latents, t, feats, mask)  # B x (C, h, w)
        sum(o.float().square().mean() for o in out).backward()

    configs: list[dict[str, Any]] = []
    compile_error = None
    for compiled in (False, True):
        if compiled:
            model.compile_blocks(backend=ctx.compile_backend)
        for ac in ("off", "every_2", "full"):
            row: dict[str, Any] = {"activation_checkpointing": ac, "compile": compiled}
            configs.append(row)
            ctx.partial("model_step", {"configs": configs})  # what a killed check still reports
            # the first compiled setting also compiles (inductor: a minute or two for the three block kinds)
            need = 30 + (ctx.compile_estimate_s if compiled and ac == "off" else 0)
            if compiled and compile_error:
                row["skipped"] = f"compile failed above: {compile_error}"
                continue
            if budget.left() - reserve_s < need:
                row["skipped"] = (f"budget: {budget.left():.0f}s left, {reserve_s:.0f}s kept for the next part, "
                                  f"{need:.0f}s needed")
                continue
            model.set_activation_checkpointing(ac)
            try:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                step()
                _sync(dev)
                row["first_step_s"] = round(time.perf_counter() - t0, 2)  # includes compilation
                for _ in range(s.warmup - 1):
                    step()
                ms = _timed_ms(step, s.iters, dev)
            except Exception as e:  # noqa: BLE001 - an OOM or a compile failure is this setting's result
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                compile_error = compile_error or (row["error"] if compiled else None)
            if "error" in row:  # freed here, once the traceback no longer holds the step's activations
                model.zero_grad(set_to_none=True)
                _free_accelerator()
                continue
            row["ms_per_step"] = round(ms, 2)
            row["image_tokens_per_s"] = round(sum(img_tokens) / ms * 1e3, 1)
            row["mfu"] = None if ctx.peak_flops is None else round(flops / (ms / 1e3) / ctx.peak_flops, 4)
            if dev.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 2)
            else:  # the process's high-water mark (it only grows)
                row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    done = [r for r in configs if "ms_per_step" in r]
    return {"model": "nextdit_tiny" if s is TINY else "nextdit_2b", "params": n_params, "attention": backend,
            # bf16 weights + bf16 gradients: peak memory minus this is activations and workspace
            "weights_and_grads_gib": round((2 * n_params + 2 * trainable) / GIB, 2),
            "latents": s.latents, "caption_tokens": s.captions, "image_tokens": sum(img_tokens),
            "flops_per_step": flops, "peak_flops": ctx.peak_flops, "peak_source": ctx.peak_source,
            "compile_backend": ctx.compile_backend, "configs": configs, "passed": bool(done)}


# ---------------------------------------------------------------------------------------------
# c. DeepSpeed bf16 training, SIGKILL, resume


def read_log(run_dir: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """log.jsonl -> ({step: metrics, later records overriding}, [events])."""
    steps: dict[int, dict[str, Any]] = {}
    events = []
    path = run_dir / "log.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the line being written while a run goes on
            continue
        if "event" in r:
            events.append(r)
        else:
            steps.setdefault(r["step"], {}).update(r)
    return steps, events


def part_train_resume(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    from lumina_illus.train.tiny_run import make_tiny_run

    s = ctx.sizes
    world = make_tiny_run(ctx.work / f"world_{s.train_images}x{s.train_size}px", s.train_images, s.train_size)
    runs = world.parent / "runs"
    for name in ("ref", "killed"):  # a fresh start, never a resume from an earlier check
        shutil.rmtree(runs / name, ignore_errors=True)
        (runs.parent / f"{name}.out").unlink(missing_ok=True)
    gb, mb, ga = s.train_batch
    k = s.ckpt_every  # the kill comes after the checkpoint of step k
    arch = "{" + ", ".join(f"{key}: {v}" for key, v in s.train_arch.items()) + "}"
    overrides = [f"model.arch={arch}", "train.precision=bf16", "train.activation_checkpointing=every_2",
                 f"train.global_batch={gb}", f"train.micro_batch={mb}", f"train.grad_accum={ga}",
                 f"train.max_steps={s.train_steps}", f"checkpoint.every_steps={k}", "optim.lr=2e-4",
                 "optim.schedule=constant",
                 "checkpoint.export_dtype=bf16"]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if ctx.device.type == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    def launch(name: str, *extra: str) -> subprocess.Popen:
        log = (runs.parent / f"{name}.out").open("a")
        return subprocess.Popen(["bash", "launch/train_lu.sh", str(world), "--override", f"run.name={name}",
                                 *overrides, *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def wait(proc: subprocess.Popen, name: str) -> None:
        try:
            proc.wait(timeout=max(budget.left(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"run {name} still running when the budget ran out") from None
        if proc.returncode != 0:
            tail = (runs.parent / f"{name}.out").read_text()[-3000:]
            raise RuntimeError(f"run {name} exited with {proc.returncode}:\n{tail}")

    t0 = time.perf_counter()
    ref = launch("ref")  # the uninterrupted run, side by side with the one to kill
    # the run to kill would go on far past the end (as a crashed run would have), so it cannot finish
    # before the kill comes; with the constant LR schedule max_steps changes nothing in steps 1..k+1
    killed = launch("killed", f"train.max_steps={100 * s.train_steps}")
    ctx.partial("train_resume", {"stage": "ref and killed started"})
    while not any(st > k for st in read_log(runs / "killed")[0]):  # step k+1 logged: checkpoint k complete
        if killed.poll() is not None or budget.left() < 1:
            os.killpg(killed.pid, signal.SIGKILL)
            raise RuntimeError(f"run killed ended ({killed.poll()}) or the budget ran out before step {k + 1}")
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    latest = (runs / "killed" / "ckpt" / "latest").read_text()
    resumed = launch("killed")
    ctx.partial("train_resume", {"stage": "killed after step k+1 and resumed", "latest_at_kill": latest})
    wait(ref, "ref")
    wait(resumed, "killed (resumed)")
    t_runs = time.perf_counter() - t0

    ref_steps, ref_events = read_log(runs / "ref")
    steps, events = read_log(runs / "killed")
    last = s.train_steps
    assert sorted(ref_steps) == sorted(steps) == list(range(1, last + 1)), (sorted(ref_steps), sorted(steps))

    def rel(i: int) -> float:
        a, b = steps[i]["train/loss"], ref_steps[i]["train/loss"]
        return abs(a - b) / max(abs(b), 1e-12)

    floor = max(rel(i) for i in range(1, k + 1))  # same code, no resume: the run-to-run difference
    after = [rel(i) for i in range(k + 1, last + 1)]
    exact = all(steps[i]["train/loss"] == ref_steps[i]["train/loss"] for i in range(k + 1, last + 1))
    same_data = all(steps[i]["data/keys_crc"] == ref_steps[i]["data/keys_crc"] for i in range(1, last + 1))
    resumed_at = [e["step"] for e in events if e["event"] == "resumed"]
    prec = next((e for e in ref_events if e["event"] == "precision"), {})
    tolerance = max(10 * floor, 1e-4) if floor > 0 else 0.0
    passed = same_data and latest == f"step_{k:07d}" and resumed_at == [k] and max(after) <= tolerance
    return {"arch": s.train_arch, "steps": last, "checkpoint_every": k, "killed_after_step": k + 1,
            "latest_at_kill": latest, "resumed_at": resumed_at, "same_data": same_data,
            "losses_equal_after_resume": exact, "max_rel_diff_after_resume": max(after),
            "max_rel_diff_before_kill": floor, "tolerance": tolerance,
            "losses_ref": [ref_steps[i]["train/loss"] for i in range(1, last + 1)],
            "losses_resumed": [steps[i]["train/loss"] for i in range(1, last + 1)],
            "precision": {key: prec.get(key) for key in ("module", "master", "optimizer_states", "grad_accum")},
            "attention": _config_attention(runs / "ref"), "runs_s": round(t_runs, 1), "passed": passed}


def _config_attention(run_dir: Path) -> str | None:
    import yaml

    cfg = run_dir / "config.yaml"
    return yaml.safe_load(cfg.read_text())["model"]["arch"].get("attention") if cfg.is_file() else None


# ---------------------------------------------------------------------------------------------
# report


def markdown(report: dict[str, Any]) -> str:
    """BENCHMARKS-ready rows of whatever parts produced results."""
    m = report["machine"]
    lines = [f"GPU check ({report['started'][:10]}, {m['device']}, torch {m['torch']}, CUDA {m['cuda']}, "
             f"bench/gpu_check.py {' '.join(report['argv'])})", ""]
    parts = report["parts"]
    a = parts.get("attention", {}).get("result")
    if a:
        lines += [f"Attention, bf16, {len(a['lens'])} sequences ({a['tokens']} tokens), {a['heads'][0]}/{a['heads'][1]} "
                  f"heads x {a['heads'][2]}; max error vs {a['reference']}:", "",
                  "| backend | out | dq | dk | dv | x SDPA-bf16 error (worst) | fwd ms | fwd+bwd ms |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in a["backends"].items():
            if "max_err" not in r:
                lines.append(f"| {name} | {r['skipped']} | | | | | | |")
                continue
            e = r["max_err"]
            worst = f"{max(r['err_vs_sdpa_bf16'].values()):.2f}" if "err_vs_sdpa_bf16" in r else "1 (baseline)"
            lines.append(f"| {name} | {e['out']:.2e} | {e['dq']:.2e} | {e['dk']:.2e} | {e['dv']:.2e} | {worst} | "
                         f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
        lines.append("")
    b = parts.get("model_step", {}).get("result")
    if b:
        peak = "no peak known: no MFU" if b["peak_flops"] is None else \
            f"MFU at {b['peak_flops'] / 1e12:.0f} TFLOP/s ({b['peak_source']})"
        lines += [f"{b['model']} ({b['params'] / 1e9:.3f}B) forward+backward, bf16, attention {b['attention']}, "
                  f"{len(b['latents'])} images packed ({b['image_tokens']} image tokens), {peak}:", "",
                  "| activation checkpointing | compile | ms/step | image tokens/s | MFU | peak memory GiB | first step s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in b["configs"]:
            if "ms_per_step" not in r:
                lines.append(f"| {r['activation_checkpointing']} | {r['compile']} | {r.get('error') or r.get('skipped')} "
                             "| | | | |")
                continue
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            mem = r.get("peak_mem_gib", r.get("peak_rss_gib"))
            lines.append(f"| {r['activation_checkpointing']} | {r['compile']} | {r['ms_per_step']:.1f} | "
                         f"{r['image_tokens_per_s']:.0f} | {mfu} | {mem} | {r['first_step_s']} |")
        lines.append("")
    c = parts.get("train_resume", {}).get("result")
    if c:
        lines += ["| DeepSpeed bf16 run | steps | SIGKILL after | resumed from | same data | losses after resume | "
                  "max rel. diff after / before the kill |", "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {c['arch']} ({c['attention']}) | {c['steps']} | step {c['killed_after_step']} | {c['latest_at_kill']} "
                  f"| {c['same_data']} | {'equal' if c['losses_equal_after_resume'] else 'differ'} | "
                  f"{c['max_rel_diff_after_resume']:.2e} / {c['max_rel_diff_before_kill']:.2e} |", ""]
    for name, p in parts.items():
        if p["status"] != "ok":
            lines.append(f"- {name}: {p['status']}: {p.get('error') or p.get('reason') or 'criteria not met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON; rows go to the same name with .md")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (the CI dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (same code paths)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="time budget of the whole check (default 8 min)")
    ap.add_argument("--parts", default="attention,model_step,train_resume", help="comma-separated parts to run")
    ap.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheel folder for missing packages")
    ap.add_argument("--site", type=Path, default=None, help="install missing packages into this folder")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: beside --out)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device name)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor, CPU aot_eager)")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:] if argv is None
                              else argv, "budget_s": args.budget_s, "parts": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, args.out)
        if "machine" in report:
            args.out.with_suffix(".md").write_text(markdown(report))

    report["packages"] = ensure_packages(NEEDED, args.wheels, args.site)
    save()
    import torch

    try:  # lumina_illus.train imports DeepSpeed: without it parts a and b still run
        from lumina_illus.train.telemetry import PEAK_FLOPS, git_revision

        git: dict[str, Any] = git_revision()
    except ImportError as e:
        PEAK_FLOPS, git = {}, {"error": f"lumina_illus.train not importable: {e}"}
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    else:
        key = next((k for k in PEAK_FLOPS if device.type == "cuda" and k in name), None)
        peak = PEAK_FLOPS[key] if key else None
        source = f"{key} dense bf16 (telemetry.PEAK_FLOPS)" if key else "unknown device"
    report["machine"] = {"device": name, "device_type": device.type, "torch": torch.__version__,
                         "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count(),
                         "git": git}
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(1)  # tiny tensors: threads cost more than they bring
    sizes = TINY if args.tiny else FULL
    def partial(name: str, data: dict[str, Any]) -> None:
        report["parts"][name]["partial"] = data
        save()

    ctx = Ctx(device=device, sizes=sizes, work=args.work or args.out.parent / (args.out.stem + "_work"),
              compile_backend=args.compile_backend or ("aot_eager" if device.type == "cpu" else "inductor"),
              peak_flops=peak, peak_source=source, compile_estimate_s=0 if args.tiny else 150, partial=partial)
    ctx.work.mkdir(parents=True, exist_ok=True)
    wanted = args.parts.split(",")
    reserve = 0.0 if args.tiny else 180.0  # part c on the GPU: 3 DeepSpeed launches
    parts = [Part("attention", lambda b: part_attention(ctx, b), 5),
             Part("model_step", lambda b: part_model_step(ctx, b, reserve if "train_resume" in wanted else 0), 30),
             Part("train_resume", lambda b: part_train_resume(ctx, b), 20 if args.tiny else 120)]
    unknown = set(wanted) - {p.name for p in parts}
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)}")
    run_parts([p for p in parts if p.name in wanted], report, budget, save)
    report["seconds"] = round(args.budget_s - budget.left(), 1)
    save()
    print(markdown(report))
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
