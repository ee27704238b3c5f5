"""DIP speed: this fitter against the one it replaced, per image per iteration.

Every fit is timed in a fresh process (the heap tuning of ``advpurify/heap.py`` is process-wide,
so the old fitter must not inherit it), in interleaved rounds (medians, so machine load hits
every configuration alike), at batch 1 and batch ``--batch``:

- ``before``: the fitter before issue 15 (``benchmarks/dip_reference.py``: per-weight Python
  Adam, host syncs, per-image arrays trimmed by hand, 1x1 convs through the conv dispatch) with
  glibc's default heap;
- ``after``: the current fitter (flat Adam over one buffer, no host syncs, huge-page heap as the
  ``advpurify`` commands set it up);
- ``after, default heap``: the current fitter with ``ADVPURIFY_HEAP=default`` (the heap's share).

Each worker warms up with a 2-iteration fit of the same batch, then times ``--iterations``.
Also printed: GFLOP/s of the step (convolutions and matrix products counted by
``torch.utils.flop_counter``) against ``torch.mm`` of 2048 x 2048 in the same run, and levers on
one network's forward + backward: channels-last convolutions, and with ``--compile``
``torch.compile`` (its compile time printed; outputs compared with eager), with ``--bf16``
bf16 autocast (gradients compared with float32).

    .venv/bin/python benchmarks/bench_dip.py [--size 224] [--iterations 20] [--batch 8] \
        [--threads 2] [--rounds 3] [--compile] [--bf16] [--skip-fits] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dip_reference import fit_group_reference  # noqa: E402

from advpurify.devices import resolve_device  # noqa: E402
from advpurify.models.skipnet import SkipNet  # noqa: E402
from advpurify.purifiers.dip import DipSettings, fit  # noqa: E402

CLOCK = time.perf_counter  # --cpu-time: process CPU time, steadier than wall time under load


CONFIGS = {
    # name: (fitter, environment)
    "before": ("before", {"ADVPURIFY_HEAP": "default"}),
    "after": ("after", {"ADVPURIFY_HEAP": "large-pages"}),  # what the CLI sets
    "after, default heap": ("after", {"ADVPURIFY_HEAP": "default"}),
}


def per_image_iteration(images: torch.Tensor, settings: DipSettings, fitter: str) -> float:
    seeds = list(range(images.shape[0]))
    if images.is_cuda:
        torch.cuda.synchronize()
    began = CLOCK()
    if fitter == "before":
        with torch.enable_grad():
            fit_group_reference(images, seeds, settings, None)
    else:
        fit(images, seeds, settings)
    if images.is_cuda:
        torch.cuda.synchronize()
    return (CLOCK() - began) / settings.iterations / images.shape[0]


def worker(args: argparse.Namespace) -> None:
    """One measurement in this fresh process: warm up, then time one fit."""
    fitter, batch = args.worker.split(":")
    device = resolve_device(args.device)
    images = sample_images(int(batch), args.size, device)
    warm = DipSettings.from_preset(args.preset, iterations=2)
    per_image_iteration(images, warm, fitter)
    settings = DipSettings.from_preset(args.preset, iterations=args.iterations)
    print(json.dumps({"seconds": per_image_iteration(images, settings, fitter)}))


def sample_images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, size, size, generator=gen).to(device)


def in_fresh_process(args: argparse.Namespace, fitter: str, batch: int, env: dict) -> float:
    command = [sys.executable, __file__, "--worker", f"{fitter}:{batch}"]
    for flag in ("size", "iterations", "preset", "device"):
        command += [f"--{flag}", str(getattr(args, flag))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.cpu_time:
        command.append("--cpu-time")
    done = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"worker {fitter}:{batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def interleaved(
    runs: dict[str, Callable[[], float]], rounds: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    for run in runs.values():  # warm-up: allocator, oneDNN / cuDNN plans
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(v) for name, v in times.items()}, times


def mm_gflops(device: torch.device, rounds: int) -> float:
    a = torch.rand(2048, 2048, device=device)
    b = torch.rand(2048, 2048, device=device)
    best = []
    for _ in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = CLOCK()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best.append(CLOCK() - began)
    return 2 * 2048**3 / statistics.median(best[1:]) / 1e9


class OneNet:
    """Forward + backward of one network on one image: what every DIP step runs."""

    def __init__(self, settings: DipSettings, size: int, device: torch.device) -> None:
        self.net = SkipNet(settings.skip_config(), 1, seeds=[0], device=device)
        self.params = {
            k: p.detach().clone().requires_grad_() for k, p in self.net.named_parameters()
        }
        gen = torch.Generator(device=device).manual_seed(1)
        self.z = torch.rand(1, settings.input_depth, size, size, generator=gen, device=device)
        self.target = torch.rand(1, 3, size, size, generator=gen, device=device)

    def loss(self, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.net, params, (z,))
        return (out - self.target).square().mean()

    def step(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        z = self.z if z is None else z
        return list(torch.autograd.grad(self.loss(self.params, z), list(self.params.values())))

    def step_bf16(self) -> list[torch.Tensor]:
        """The network under bf16 autocast (oneDNN's AMX kernels where the CPU has them);
        weights, loss and gradients stay float32."""
        with torch.autocast(self.z.device.type, dtype=torch.bfloat16):
            out = functional_call(self.net, self.params, (self.z,))
        loss = (out.float() - self.target).square().mean()
        return list(torch.autograd.grad(loss, list(self.params.values())))

    def flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return counter.get_total_flops()


def channels_last(run: Callable[[], object]) -> object:
    """``run`` with every convolution's input and weight in the channels-last layout (oneDNN's
    NHWC path; BatchNorm, LeakyReLU, padding and upsampling follow their input's layout)."""
    conv2d = F.conv2d

    def conv2d_nhwc(x: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        nhwc = torch.channels_last
        x, weight = x.contiguous(memory_format=nhwc), weight.contiguous(memory_format=nhwc)
        return conv2d(x, weight, *args, **kwargs)

    F.conv2d = conv2d_nhwc
    try:
        return run()
    finally:
        F.conv2d = conv2d


def timed(run: Callable[[], object], device: torch.device, repeat: int = 2) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = CLOCK()
    for _ in range(repeat):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (CLOCK() - began) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--skip-fits", action="store_true", help="levers only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time (use with --threads 1 on a shared machine)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    device = resolve_device(args.device)
    settings = DipSettings.from_preset(args.preset, iterations=args.iterations)
    print(
        f"DIP {args.preset} preset ({settings.channels} ch, {settings.scales} scales), "
        f"{args.size}x{args.size}, {device}, {torch.get_num_threads()} threads, "
        f"load {os.getloadavg()[0]:.1f}; medians of {args.rounds} interleaved rounds"
        + ("; CPU time" if args.cpu_time else "; wall time")
    )
    one = OneNet(settings, args.size, device)
    flops = one.flops()
    mm = mm_gflops(device, args.rounds)

    median: dict[str, float] = {}
    if not args.skip_fits:
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for batch in (1, args.batch):
                for name, (fitter, env) in CONFIGS.items():
                    value = in_fresh_process(args, fitter, batch, env)
                    times.setdefault(f"batch {batch}, {name}", []).append(value)
        median = {name: statistics.median(v) for name, v in times.items()}
        print(f"fit, {args.iterations} iterations, one process each (s per image per iteration):")
        for name, value in median.items():
            spread = ", ".join(f"{v:.4f}" for v in times[name])
            gflops = flops / value / 1e9
            print(f"  {name:30s} {value:.4f}  ({spread})  {gflops:.1f} GFLOP/s")
        for batch in (1, args.batch):
            ratio = median[f"batch {batch}, before"] / median[f"batch {batch}, after"]
            heap = median[f"batch {batch}, after, default heap"] / median[f"batch {batch}, after"]
            print(
                f"after vs before, batch {batch}: {ratio:.2f}x faster per image "
                f"(of which the huge-page heap {heap:.2f}x)"
            )
        if args.json:
            args.json.write_text(json.dumps({"times": times, "median": median}, indent=1))

    levers: dict[str, Callable[[], float]] = {
        "eager": lambda: timed(one.step, device),
    }
    if device.type == "cpu":
        levers["channels-last"] = lambda: timed(lambda: channels_last(one.step), device)
    if args.bf16:
        amx = device.type == "cpu" and torch.cpu._is_amx_tile_supported()
        eager, low = one.step(), one.step_bf16()
        flat32, flat16 = (
            torch.cat([g.flatten() for g in eager]),
            torch.cat([g.flatten() for g in low]),
        )
        diff = float((flat32 - flat16).norm() / flat32.norm())
        print(f"bf16 autocast{' (AMX)' if amx else ''}: |grad diff| / |grad| {diff:.1e}")
        levers["bf16 autocast"] = lambda: timed(one.step_bf16, device)
    compile_seconds = None
    if args.compile:
        grad_fn = torch.compile(torch.func.grad(one.loss))
        began = CLOCK()
        compiled = grad_fn(one.params, one.z)
        compile_seconds = CLOCK() - began
        eager = one.step()
        diff = max(
            float((a - b).abs().max()) for a, b in zip(eager, compiled.values(), strict=True)
        )
        print(f"torch.compile: {compile_seconds:.1f} s to compile; max |grad diff| {diff:.2e}")
        levers["torch.compile"] = lambda: timed(lambda: grad_fn(one.params, one.z), device)
    lever_median, _ = interleaved(levers, args.rounds)
    print(f"one network's forward + backward, batch 1 ({flops / 1e9:.2f} GFLOP counted):")
    for name, value in lever_median.items():
        print(
            f"  {name:22s} {value * 1000:.1f} ms  {flops / value / 1e9:.1f} GFLOP/s  "
            f"{lever_median['eager'] / value:.2f}x eager"
        )
    print(f"torch.mm 2048^2 in the same run: {mm:.1f} GFLOP/s")
    if median:
        step = median["batch 1, after"]
        print(f"DIP step at batch 1: {flops / step / 1e9 / mm:.0%} of torch.mm's GFLOP/s")


if __name__ == "__main__":
    main()
