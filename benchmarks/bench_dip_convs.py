"""Where a DIP step's convolution time goes on the CPU, and which bit-identical splits pay.

    .venv/bin/python benchmarks/bench_dip_convs.py [--threads 2] [--rounds 15]

For the `fast` preset's 3x3 convolutions at 224 x 224 (input reflection-padded by one), forward
and backward, in interleaved rounds (medians): the whole backward in one call as autograd makes
it, the input and weight gradients in separate calls, the input gradient of a 20-channel input
split into its 4 + 16 channels, and the same in the channels-last layout. Then whether each
split gives the unsplit call's numbers bit for bit on shapes of the fast and paper presets.
Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKWARD = torch.ops.aten.convolution_backward


def backward(grad, x, w, stride: int, mask: tuple[bool, bool, bool]):
    return BACKWARD(grad, x, w, None, (stride,) * 2, (0, 0), (1, 1), False, (0, 0), 1, mask)


def split_input_grad(grad, x, w, stride: int) -> torch.Tensor:
    """The input gradient of the first ``cin % 16`` channels and of the rest, in two calls."""
    r = x.shape[1] % 16
    pairs = ((x[:, :r], w[:, :r].contiguous()), (x[:, r:], w[:, r:].contiguous()))
    grads = [backward(grad, xi, wi, stride, (True, False, False))[0] for xi, wi in pairs]
    return torch.cat(grads, 1)


def tensors(cin: int, cout: int, size: int, stride: int = 1, seed: int = 0, layout=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cin, size + 2, size + 2, generator=gen)
    w = torch.randn(cout, cin, 3, 3, generator=gen) * 0.1
    grad = torch.randn(1, cout, size // stride, size // stride, generator=gen)
    if layout is not None:
        x, w, grad = (t.contiguous(memory_format=layout) for t in (x, w, grad))
    return grad, x, w


def timings(rounds: int) -> dict[str, float]:
    cases: dict[str, Callable[[], object]] = {}
    for cin in (20, 16):
        g, x, w = tensors(cin, 16, 224)
        cases[f"{cin}->16 forward"] = lambda x=x, w=w: F.conv2d(x, w)
        cases[f"{cin}->16 backward, one call"] = lambda a=(g, x, w): backward(
            *a, 1, (True, True, False)
        )
        cases[f"{cin}->16 input grad"] = lambda a=(g, x, w): backward(*a, 1, (True, False, False))
        cases[f"{cin}->16 weight grad"] = lambda a=(g, x, w): backward(*a, 1, (False, True, False))
    g, x, w = tensors(20, 16, 224)
    cases["20->16 input grad, 4 + 16 channels"] = lambda: split_input_grad(g, x, w, 1)
    gl, xl, wl = tensors(20, 16, 224, layout=torch.channels_last)
    cases["20->16 forward, channels-last"] = lambda: F.conv2d(xl, wl)
    cases["20->16 backward, channels-last"] = lambda: backward(gl, xl, wl, 1, (True, True, False))
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def identical_splits() -> dict[str, tuple[bool, bool]]:
    """(separate calls equal the one call, the 4 + 16 input-gradient split equals it)."""
    found = {}
    for cin, cout in ((20, 16), (132, 128)):
        for size in (224, 112, 56, 28, 14):
            for stride in (1, 2):
                if cin == 132 and size > 56:
                    continue
                g, x, w = tensors(cin, cout, size, stride, seed=size)
                gx, gw, _ = backward(g, x, w, stride, (True, True, False))
                separate = torch.equal(gx, backward(g, x, w, stride, (True, False, False))[0])
                separate &= torch.equal(gw, backward(g, x, w, stride, (False, True, False))[1])
                split = torch.equal(gx, split_input_grad(g, x, w, stride))
                found[f"{cin}->{cout} at {size}, stride {stride}"] = (separate, split)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, medians of {args.rounds} interleaved rounds, ms")
    for name, ms in timings(args.rounds).items():
        print(f"  {name:40s} {ms:7.2f}")
    print("bit for bit: (separate input/weight calls, 4 + 16 input-gradient split)")
    for name, (separate, split) in identical_splits().items():
        print(f"  {name:28s} {separate!s:6s} {split!s:6s}")


if __name__ == "__main__":
    main()
