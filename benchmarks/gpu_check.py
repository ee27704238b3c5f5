"""One unattended run that proves the GPU paths on one NVIDIA GPU in minutes: ``make gpu-check``.

    python benchmarks/gpu_check.py OUT_DIR [--data DIR] [--budget 480] [--dry-run]

Writes two files: ``OUT_DIR/gpu_check.json`` (rewritten after every step) and
``OUT_DIR/gpu_check.log`` (every progress line, timestamped). Each step runs in its own process
with a slice of one global time budget (default 480 s = 8 minutes); a step that runs past its
slice is killed and recorded as ``cut``, an error is recorded and the next step runs. Rows a step
has produced before a cut stay (``OUT_DIR/steps/STEP.jsonl``, one line per row, flushed as it is
produced, removed once merged into the JSON). No network, nothing installed: the script needs
only torch, torchvision, timm, onnx, onnxruntime, typer, rich,
OpenCV, scikit-image, safetensors and simplejpeg (docs/gpu.md: bringing its wheel to a machine
with no registry), and says what it skipped for anything else (pytest, TensorRT, onnxruntime-gpu).

Steps: ``env`` (machine, versions, backends present), ``tests`` (``pytest -m gpu``), ``dip``
(fast and paper presets at 224, batch 1/8/32/64; grouped vs split conv, TF32 on/off, bf16
autocast when it keeps the PSNR curve; GPU utilisation), ``ppgn`` (its step, random weights of
the true shapes), ``context-encoder``, ``transforms`` (each on CUDA vs the CPU), ``classify``
(every installed backend, fp32/fp16, batch 1/16/128, parity against torch) and ``purify-batch``
(``--device cuda`` vs ``--device cpu`` on the sample images, outputs compared). The per-method
timings call ``advpurify.export.bench.bench_methods`` (``advpurify bench --method``).

``--dry-run`` runs every step on tiny sizes, on the CPU when there is no GPU (CI runs it via
tests/test_gpu_check.py so the script cannot rot). What is measured and where the figures go:
docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Seconds of the budget each step asks for; the time a step leaves unused goes to the later ones.
STEPS: dict[str, float] = {
    "env": 25,
    "tests": 90,
    "dip": 110,
    "ppgn": 35,
    "context-encoder": 30,
    "transforms": 45,
    "classify": 80,
    "purify-batch": 70,
}
RESERVE_S = 8.0  # kept back for writing the final JSON
TRANSFORMS = ("rescale", "jpeg", "bitdepth", "median", "tvm", "randpad")
PURIFY_BATCH_METHODS = ("rescale", "median", "jpeg", "tvm")
# purify-batch on CUDA vs the CPU, compared on the 8-bit output files: equal within this.
MEAN_ABS_LEVELS = 0.5  # mean |cuda - cpu| over all values, in 8-bit levels
MAX_FRACTION_OVER_ONE_LEVEL = 0.001  # values differing by more than one level, fraction


def stamp() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


# ============================================================================ the parent


class Run:
    """The parent: runs every step in a child process within the budget, writes JSON + log."""

    def __init__(self, out: Path, budget: float, dry_run: bool, data: Path | None) -> None:
        self.out = out
        self.start = time.monotonic()
        self.budget = budget
        self.dry_run = dry_run
        self.data = data
        (out / "steps").mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-home-"))
        self.done: list[Path] = []
        self.log = open(out / "gpu_check.log", "a", buffering=1)  # noqa: SIM115 (whole run)
        self.result: dict = {
            "script": "benchmarks/gpu_check.py",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dry_run": dry_run,
            "budget_s": budget,
            "data": str(data) if data else None,
            "tolerance": {
                "purify_batch_mean_abs_levels": MEAN_ABS_LEVELS,
                "purify_batch_max_fraction_over_one_level": MAX_FRACTION_OVER_ONE_LEVEL,
            },
            "steps": {},
        }

    def say(self, message: str) -> None:
        line = f"[{stamp()} +{time.monotonic() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write(self) -> None:
        path = self.out / "gpu_check.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        os.replace(temporary, path)

    def slice_for(self, index: int, names: list[str]) -> float:
        left = self.budget - (time.monotonic() - self.start) - RESERVE_S
        wanted = [STEPS[n] for n in names[index:]]
        return max(0.0, left * wanted[0] / sum(wanted))

    def run_all(self, only: list[str] | None) -> int:
        names = [n for n in STEPS if not only or n in only]
        self.say(f"gpu_check: {', '.join(names)}; budget {self.budget:.0f} s; out {self.out}")
        self.write()
        for index, name in enumerate(names):
            seconds = self.slice_for(index, names)
            if seconds < 3:
                self.result["steps"][name] = {"status": "cut", "error": "no time left"}
                self.say(f"step {name}: cut before starting (no time left)")
                self.write()
                continue
            self.result["steps"][name] = self.run_step(name, seconds)
            self.write()
            for path in self.done:  # few files come back from a GPU machine: keep just two
                path.unlink(missing_ok=True)
            self.done.clear()
        self.result["seconds"] = round(time.monotonic() - self.start, 1)
        self.write()
        statuses = {n: s.get("status") for n, s in self.result["steps"].items()}
        self.say(f"done in {self.result['seconds']} s: {statuses}")
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.log.close()
        # Exit 1 when a step failed as a whole (no torch, say): nothing of it was proved. A
        # step with some failed measurements, or cut by its slice, still reported what it had.
        return 1 if "error" in statuses.values() else 0

    def run_step(self, name: str, seconds: float) -> dict:
        rows_path = self.out / "steps" / f"{name}.jsonl"
        rows_path.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), str(self.out), "--step", name]
        if self.dry_run:
            command.append("--dry-run")
        if self.data:
            command += ["--data", str(self.data)]
        env = dict(os.environ)
        # The repository itself, not an installed copy: the GPU machine installs nothing.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["GPU_CHECK_DEADLINE"] = str(time.time() + seconds)
        env["PYTHONUNBUFFERED"] = "1"
        # ONNX files and engines go to a scratch cache, not into OUT_DIR (which travels back).
        env.setdefault("ADVPURIFY_HOME", str(self.scratch))
        self.say(f"step {name}: start (slice {seconds:.0f} s)")
        begun = time.monotonic()
        child = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a cut kills its children too
        )
        relay = threading.Thread(target=self._relay, args=(name, child), daemon=True)
        relay.start()
        status, error = "ok", None
        try:
            code = child.wait(timeout=seconds)
            if code != 0:
                status, error = "error", f"step process exited with {code}"
        except subprocess.TimeoutExpired:
            status, error = "cut", f"ran past its {seconds:.0f} s slice"
            with _quiet():
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        relay.join(timeout=5)
        records = _read_rows(rows_path)
        errors = [r for r in records if r.get("kind") == "error"]
        if status == "ok" and errors:
            status = "ok-with-errors"
        elapsed = round(time.monotonic() - begun, 1)
        self.say(f"step {name}: {status} in {elapsed} s ({len(records)} records)")
        self.done.append(rows_path)  # merged into the JSON: removed once that is written
        return {
            "status": status,
            "error": error,
            "seconds": elapsed,
            "slice_s": round(seconds, 1),
            "records": records,
        }

    def _relay(self, name: str, child: subprocess.Popen) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            if line:
                stamped = line if line.startswith("[") else f"[{stamp()}] {line}"
                print(f"  {name}: {stamped}", flush=True)
                self.log.write(f"  {name}: {stamped}\n")


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed step may be cut short
            rows.append({"kind": "error", "error": f"unreadable line: {line[:200]}"})
    return rows


# ============================================================================ a step (child)


class Step:
    """What a step function gets: where to record, the deadline, the sizes of this run."""

    def __init__(self, out: Path, name: str, dry_run: bool, data: Path | None) -> None:
        import torch

        self.name = name
        self.dry_run = dry_run
        self.deadline = float(os.environ.get("GPU_CHECK_DEADLINE", time.time() + 600))
        self.rows = open(out / "steps" / f"{name}.jsonl", "a", buffering=1)  # noqa: SIM115
        self.out = out
        self.has_cuda = torch.cuda.is_available()
        # The dry run stands the CPU in for the GPU where there is none.
        self.gpu = "cuda" if self.has_cuda else ("cpu" if dry_run else None)
        self.size = 32 if dry_run else 224
        self.data = data
        # Untimed and timed calls per configuration.
        self.repeats = {"warmup": 0, "iterations": 1} if dry_run else {"warmup": 1, "iterations": 3}

    def repeats_on(self, device: str) -> dict:
        """Fewer calls on the CPU side of a CUDA-vs-CPU comparison: it is the slow one."""
        if device == "cpu" and self.has_cuda:
            return {"warmup": 0, "iterations": 2}
        return self.repeats

    def say(self, message: str) -> None:
        print(f"[{stamp()}] {message}", flush=True)

    def record(self, kind: str = "row", **fields) -> None:
        self.rows.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")

    def left(self) -> float:
        return self.deadline - time.time()

    def attempt(self, label: str, work: Callable[[], None], *, need_s: float = 1.0) -> None:
        """Run one measurement; an error is recorded and the step goes on."""
        if self.left() < need_s:
            self.record("cut", label=label, error="skipped: the step's slice is spent")
            self.say(f"{label}: skipped, slice spent")
            return
        self.say(f"{label}: start")
        try:
            work()
        except Exception as error:  # every failure is a result here, never the end of the run
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.record("error", label=label, error=f"{type(error).__name__}: {first}")
            self.say(f"{label}: ERROR {type(error).__name__}: {first}")
            traceback.print_exc(limit=4, file=sys.stdout)

    def bench_rows(self, label: str, rows, **extra) -> None:
        for r in rows:
            row = {"label": label, **r.to_json(), **extra}
            self.record(**row)
            self.say(
                f"{label}: {r.label} {r.device} batch {r.batch_size} size {r.size}: "
                f"{r.images_per_s:.2f} img/s, p50 {r.p50_ms:.1f} ms, peak {r.peak_mb:.0f} MB"
            )


def step_env(s: Step) -> None:
    import importlib.util

    import torch

    from advpurify.export.bench import machine_info
    from advpurify.runtime.installed import BACKENDS, unavailable_reason

    s.record("machine", **machine_info())
    backends = {}
    for name in BACKENDS:
        try:
            backends[name] = unavailable_reason(name) or "present"
        except Exception as error:
            backends[name] = f"unknown: {error}"
    s.record("backends", **backends)
    s.say(f"backends: {backends}")
    optional = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "tensorrt", "ray")}
    s.record("optional", **optional)
    if s.has_cuda:
        props = torch.cuda.get_device_properties(0)
        s.record(
            "gpu",
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    smi = shutil.which("nvidia-smi")
    if smi:
        text = subprocess.run([smi], capture_output=True, text=True, timeout=10).stdout
        s.record("nvidia-smi", text=text)
    else:
        s.record("nvidia-smi", text=None, note="nvidia-smi not found")


def step_tests(s: Step) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        s.record("skipped", reason="pytest is not installed: GPU-marked tests not run")
        s.say("pytest is not installed: GPU-marked tests not run")
        return
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    command.append("--continue-on-collection-errors")  # a test module needing hypothesis, say
    if s.dry_run:  # collection only, on one file: proves the command, fast
        command += ["--collect-only", "tests/test_bench.py"]
    env = dict(os.environ)
    root = _data_root(s.data)
    if root is not None:
        env["ADVPURIFY_DATA"] = str(root)
    timeout = max(5.0, s.left() - 3)
    s.say(f"running {' '.join(command[1:])} (timeout {timeout:.0f} s)")
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    for line in lines[-40:]:
        print(line, flush=True)
    s.record("pytest", returncode=done.returncode, tail=lines[-60:], summary=lines[-1:])
    if done.returncode not in (0, 5):  # 5: no test collected (none marked gpu)
        last = lines[-1] if lines else "no output"
        s.record("error", label="pytest", error=f"pytest exited {done.returncode}: {last}")


def step_dip(s: Step) -> None:
    from advpurify.export.bench import bench_methods

    device = _need_gpu(s)
    batches = (1,) if s.dry_run else (1, 8, 32, 64)
    compare_at = 1 if s.dry_run else 32
    steps = 2 if s.dry_run else 5
    # Timed for a few steps, extrapolated (linearly, and the rows say so) to the preset's count.
    timing = dict(
        fit_steps=steps, extrapolate=True, sizes=(s.size,), devices=(device,), **s.repeats
    )
    # The dry run proves the calls, not the presets' cost: a tiny net.
    shrink = {"channels": 4, "input_depth": 4, "scales": 2} if s.dry_run else {}

    def run(label: str, preset: str, batch: int, *, conv="auto", tf32=None, precision="fp32"):
        with GpuUtilisation(enabled=device == "cuda") as util:
            rows = bench_methods(
                ["dip"],
                params={"dip": {"preset": preset, "conv": conv, **shrink}},
                batch_sizes=(batch,),
                precision=precision,
                tf32=tf32,
                **timing,
            )
        s.bench_rows(label, rows, variant=label, **util.summary())

    # Defaults first (conv auto: grouped on CUDA; torch's TF32 setting, recorded by env).
    for preset in ("fast", "paper"):
        for batch in batches:
            s.attempt(
                f"dip {preset} batch {batch}",
                lambda p=preset, b=batch: run(f"{p} default", p, b),
            )
    curve: dict = {}
    s.attempt("dip bf16 PSNR curve", lambda: curve.update(_dip_bf16_curve(s, device)))
    for preset in ("fast", "paper"):
        s.attempt(
            f"dip {preset} split conv",
            lambda p=preset: run(f"{p} split conv", p, compare_at, conv="split"),
        )
        if device == "cpu":  # on CUDA the default is already grouped
            s.attempt(
                f"dip {preset} grouped conv",
                lambda p=preset: run(f"{p} grouped conv", p, compare_at, conv="grouped"),
            )
        for tf32 in (False, True):
            label = f"{preset} tf32 {'on' if tf32 else 'off'}"
            s.attempt(
                f"dip {label}",
                lambda p=preset, t=tf32, lab=label: run(lab, p, compare_at, tf32=t),
            )
        if device == "cuda" and curve.get("keeps_curve"):
            s.attempt(
                f"dip {preset} bf16 autocast",
                lambda p=preset: run(f"{p} bf16 autocast", p, compare_at, precision="bf16"),
            )
    if device != "cuda":
        s.record("skipped", reason="bf16 autocast timed on CUDA only")


def _dip_bf16_curve(s: Step, device: str) -> dict:
    """PSNR of a DIP fit (fast preset, one real photo) against its target every few steps, in
    fp32 and under bf16 autocast: bf16 is timed only if the curves agree within 0.5 dB."""
    import torch

    from advpurify.export.bench import sample_batch
    from advpurify.purifiers.dip import DipSettings, fit

    if device != "cuda":
        return {"keeps_curve": False, "note": "bf16 needs CUDA"}
    steps = 300
    image = sample_batch(1, s.size)[:1].to(device)
    curves = {}
    for precision in ("fp32", "bf16"):
        curve: list[tuple[int, float]] = []

        def hook(it, idx, raw, avg, curve=curve):
            if it % 25 == 0:
                mse = (avg.float() - image[idx]).pow(2).mean().clamp_min(1e-12)
                curve.append((it, round(float(-10 * torch.log10(mse)), 3)))

        settings = DipSettings.from_preset("fast", iterations=steps)
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fit(image, [0], settings, on_step=hook)
        else:
            fit(image, [0], settings, on_step=hook)
        curves[precision] = curve
    gap = max(abs(a[1] - b[1]) for a, b in zip(curves["fp32"], curves["bf16"], strict=False))
    result = {"curves": curves, "max_gap_db": round(gap, 3), "keeps_curve": gap <= 0.5}
    s.record("bf16-psnr", **result)
    s.say(f"bf16 PSNR curve: max gap {gap:.2f} dB, keeps the curve: {gap <= 0.5}")
    return result


def step_ppgn(s: Step) -> None:
    from advpurify.export.bench import bench_methods

    device = _need_gpu(s)
    fit_steps = 1 if s.dry_run else 5
    plan = [(device, b) for b in ((1,) if s.dry_run else (1, 8, 32))]
    if device != "cpu":
        plan.append(("cpu", 1))
    for where, batch in plan:

        def run(where=where, batch=batch):
            rows = bench_methods(
                ["ppgn"], devices=(where,), batch_sizes=(batch,), sizes=(s.size,),
                weights="random", fit_steps=fit_steps, **s.repeats_on(where),
            )  # fmt: skip
            # The call includes E(x) and G(h_T) once; per step is an upper bound.
            for r in rows:
                s.bench_rows("ppgn", [r], ms_per_step_upper=r.p50_ms / fit_steps)

        s.attempt(f"ppgn {where} batch {batch}", run)


def step_context_encoder(s: Step) -> None:
    from advpurify.export.bench import bench_methods

    device = _need_gpu(s)
    batches = (1,) if s.dry_run else (1, 16)
    wheres = [device] if device == "cpu" else [device, "cpu"]
    for mode in ("center", "tiled"):
        for where in wheres:

            def run(mode=mode, where=where):
                rows = bench_methods(
                    ["context-encoder"], params={"context-encoder": {"mode": mode}},
                    devices=(where,), batch_sizes=batches, sizes=(s.size,), weights="random",
                    **s.repeats_on(where),
                )  # fmt: skip
                s.bench_rows(f"context-encoder {mode}", rows)

            s.attempt(f"context-encoder {mode} {where}", run)


def step_transforms(s: Step) -> None:
    from advpurify.export.bench import bench_methods

    device = _need_gpu(s)
    batches = (1, 2) if s.dry_run else (1, 32)
    wheres = [device] if device == "cpu" else [device, "cpu"]
    for method in TRANSFORMS:
        speeds: dict[str, dict[int, float]] = {}
        for where in wheres:

            def run(method=method, where=where):
                rows = bench_methods(
                    [method], devices=(where,), batch_sizes=batches, sizes=(s.size,),
                    **s.repeats_on(where),
                )  # fmt: skip
                s.bench_rows(method, rows)
                speeds[where] = {r.batch_size: r.images_per_s for r in rows}  # noqa: B023

            s.attempt(f"{method} {where}", run)
        if "cuda" in speeds and "cpu" in speeds:
            ratio = {b: speeds["cuda"][b] / speeds["cpu"][b] for b in speeds["cuda"]}
            s.record("ratio", method=method, cuda_over_cpu=ratio)
            s.say(f"{method}: CUDA / CPU images/s {ratio}")


def step_classify(s: Step) -> None:
    import torch

    from advpurify.export.bench import bench, sample_batch
    from advpurify.models.registry import get_exportable
    from advpurify.runtime.backends import create_backend
    from advpurify.runtime.installed import unavailable_reason

    model = _tiny_classifier() if s.dry_run else "efficientnet-lite0"
    if s.has_cuda:
        backends = ["torch", "ort-cuda", "tensorrt", "ort-trt", "torch-compile"]
        precisions, batches = ("fp32", "fp16"), (1, 16, 128)
    else:
        backends, precisions, batches = ["torch", "ort-cpu"], ("fp32",), (1, 2)
    if not s.dry_run and not s.has_cuda:
        raise RuntimeError("no CUDA GPU (torch.cuda.is_available() is False)")
    s.record("model", model=model, weights="random")
    for backend in ["torch", "torch-compile", "ort-cuda", "ort-trt", "tensorrt"]:
        reason = unavailable_reason(backend)
        s.record("backend", backend=backend, present=reason is None, reason=reason)
    entry = get_exportable(model)
    module = entry.build("random")
    photos = sample_batch(16 if not s.dry_run else 2, entry.sample_shape[-1])
    device = "cuda" if s.has_cuda else "cpu"
    # The reference is true fp32: TF32 off for convolutions and matmuls alike.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            reference = module.to(device).eval()(photos.to(device)).float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    for backend in backends:
        reason = unavailable_reason(backend)
        if reason:
            s.say(f"{backend}: absent ({reason})")
            continue
        for precision in precisions:

            def run(backend=backend, precision=precision):
                rows = bench(
                    [model], [backend], batches, [precision], weights="random",
                    warmup=0 if s.dry_run else 2, iterations=1 if s.dry_run else 5,
                    on_result=lambda r: s.record(label="classify", **r.to_json()),
                )  # fmt: skip
                for r in rows:
                    s.say(f"{backend} {precision} batch {r.batch_size}: {r.images_per_s:.1f} img/s")
                runner = create_backend(
                    backend, module, device=device, precision=precision,
                    sample_shape=entry.sample_shape, label=model, notify=s.say,
                )  # fmt: skip
                out = runner.run(photos.to(device)).float().cpu()
                diff = float((out - reference).abs().max())
                agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
                s.record(
                    "parity", backend=backend, precision=precision, max_abs=diff,
                    reference_max=float(reference.abs().max()), top1_agreement=agree,
                    inputs=f"{photos.shape[0]} sample photographs, random weights",
                )  # fmt: skip
                s.say(
                    f"{backend} {precision} parity vs torch fp32: max abs {diff:.2e}, "
                    f"top-1 agreement {agree:.0%}"
                )

            s.attempt(f"classify {backend} {precision}", run, need_s=5)


def step_purify_batch(s: Step) -> None:
    import numpy as np
    from PIL import Image

    images = _images_dir(s)
    methods = PURIFY_BATCH_METHODS[:1] if s.dry_run else PURIFY_BATCH_METHODS
    if images is None:
        s.record("skipped", reason="no sample images: pass --data DIR or set ADVPURIFY_DATA")
        s.say("no sample images: pass --data DIR or set ADVPURIFY_DATA")
        return
    if s.dry_run:  # three images are enough to prove the command and the comparison
        small = s.out / "dry-data"
        small.mkdir(exist_ok=True)
        for path in sorted(p for p in images.iterdir() if p.is_file())[:2]:
            shutil.copy(path, small / path.name)
        images = small
    devices = ("cuda", "cpu") if s.has_cuda else ("cpu", "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-purify-"))
    try:
        for method in methods:

            def run(method=method):
                outputs, seconds = [], []
                for index, device in enumerate(devices):
                    target = scratch / f"{method}-{device}-{index}"
                    code = "from advpurify.cli import purify_batch_main; purify_batch_main()"
                    command = [sys.executable, "-c", code, str(images), "--method", method,
                               "-o", str(target), "--device", device, "--quiet"]  # fmt: skip
                    begun = time.monotonic()
                    done = subprocess.run(
                        command, cwd=ROOT, capture_output=True, text=True,
                        timeout=max(5.0, s.left() - 2),
                    )  # fmt: skip
                    seconds.append(time.monotonic() - begun)
                    if done.returncode != 0:
                        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
                        raise RuntimeError(f"purify-batch --device {device}: {' | '.join(tail)}")
                    outputs.append(target)
                files = sorted(p.relative_to(outputs[0]) for p in outputs[0].rglob("*.png"))
                worst_mean, worst_fraction, worst_max, failing = 0.0, 0.0, 0, []
                for rel in files:
                    a = np.asarray(Image.open(outputs[0] / rel), dtype=np.int16)
                    b = np.asarray(Image.open(outputs[1] / rel), dtype=np.int16)
                    diff = np.abs(a - b)
                    mean, fraction = float(diff.mean()), float((diff > 1).mean())
                    worst_mean, worst_fraction = (
                        max(worst_mean, mean),
                        max(worst_fraction, fraction),
                    )
                    worst_max = max(worst_max, int(diff.max()))
                    if mean > MEAN_ABS_LEVELS or fraction > MAX_FRACTION_OVER_ONE_LEVEL:
                        failing.append(str(rel))
                passed = bool(files) and not failing
                s.record(
                    "purify-batch", method=method, devices=list(devices), images=len(files),
                    seconds=[round(x, 2) for x in seconds], worst_mean_abs_levels=worst_mean,
                    worst_fraction_over_one_level=worst_fraction, worst_max_levels=worst_max,
                    failing=failing[:20], equal_within_tolerance=passed,
                )  # fmt: skip
                s.say(
                    f"{method}: {len(files)} images, {devices[0]} {seconds[0]:.1f} s vs "
                    f"{devices[1]} {seconds[1]:.1f} s; worst mean |diff| {worst_mean:.3f} levels, "
                    f"max {worst_max}; equal within tolerance: {passed}"
                )

            s.attempt(f"purify-batch {method}", run, need_s=5)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tiny_classifier() -> str:
    """A tiny timm network registered for the dry run (the real run times efficientnet-lite0)."""
    import timm

    from advpurify.models.classifiers import build_classifier
    from advpurify.models.registry import register_exportable

    name = "test_efficientnet" if timm.is_model("test_efficientnet") else "efficientnet_lite0"
    size = build_classifier(f"timm:{name}", weights="random").input_size
    register_exportable(
        "gpu-check-tiny",
        lambda weights: build_classifier(f"timm:{name}", weights=weights),
        sample_shape=(3, size, size),
    )
    return "gpu-check-tiny"


def _need_gpu(s: Step) -> str:
    if s.gpu is None:
        raise RuntimeError("no CUDA GPU (torch.cuda.is_available() is False)")
    return s.gpu


def _data_root(data: Path | None) -> Path | None:
    """The folder holding ``imagenet-sample/`` (what ``$ADVPURIFY_DATA`` names), if known."""
    if data is None:
        env = os.environ.get("ADVPURIFY_DATA")
        return Path(env) if env else None
    if (data / "imagenet-sample").is_dir():
        return data
    if data.name == "imagenet-sample":
        return data.parent
    return None


def _images_dir(s: Step) -> Path | None:
    if s.data is not None and not (s.data / "imagenet-sample").is_dir():
        return s.data if s.data.is_dir() else None
    from advpurify.paths import shared_data_dir

    root = s.data if s.data is not None else shared_data_dir()
    folder = root / "imagenet-sample"
    return folder if folder.is_dir() else None


class GpuUtilisation:
    """Mean and peak GPU utilisation (%) during a block, sampled every 0.2 s with
    ``torch.cuda.utilization`` (needs pynvml) or ``nvidia-smi``; empty where neither works."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()

    def _read(self) -> float | None:
        import torch

        if self.source in (None, "torch.cuda.utilization"):
            try:
                value = float(torch.cuda.utilization())
                self.source = "torch.cuda.utilization"
                return value
            except Exception:  # pynvml missing or unusable
                self.source = "nvidia-smi"
        smi = shutil.which("nvidia-smi")
        if not smi:
            self.source = "none"
            return None
        query = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        try:
            text = subprocess.run(query, capture_output=True, text=True, timeout=2).stdout
            return float(text.strip().splitlines()[0])
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            value = self._read()
            if value is not None:
                self.samples.append(value)
            if self.source == "none":
                return

    def __enter__(self) -> GpuUtilisation:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join(timeout=3)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_util_source": self.source}
        return {
            "gpu_util_mean": round(sum(self.samples) / len(self.samples), 1),
            "gpu_util_max": max(self.samples),
            "gpu_util_source": self.source,
        }


STEP_FUNCTIONS: dict[str, Callable[[Step], None]] = {
    "env": step_env,
    "tests": step_tests,
    "dip": step_dip,
    "ppgn": step_ppgn,
    "context-encoder": step_context_encoder,
    "transforms": step_transforms,
    "classify": step_classify,
    "purify-batch": step_purify_batch,
}


def run_step(out: Path, name: str, dry_run: bool, data: Path | None) -> int:
    # Tests prove the cut deterministically by making a step slower than its slice.
    time.sleep(float(os.environ.get("GPU_CHECK_STEP_DELAY_S", "0")))
    step = Step(out, name, dry_run, data)
    step.attempt(name, lambda: STEP_FUNCTIONS[name](step), need_s=0)
    step.rows.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--data", type=Path, default=None, help="the sample images folder")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; CPU stands in")
    parser.add_argument("--only", action="append", choices=list(STEPS), help="run these steps")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.data is None and os.environ.get("ADVPURIFY_DATA"):
        args.data = Path(os.environ["ADVPURIFY_DATA"])
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else None
    if args.step:
        return run_step(args.out.resolve(), args.step, args.dry_run, data)
    return Run(args.out.resolve(), args.budget, args.dry_run, data).run_all(args.only)


if __name__ == "__main__":
    sys.exit(main())
