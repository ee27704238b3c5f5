"""A DIP network in the channels-last layout, from torch ops or native kernels, against the
shipped one.

    ADVPURIFY_HEAP=large-pages .venv/bin/python benchmarks/bench_dip_layouts.py --native

Issue 15's last levers: one `fast` network's forward + backward at 224 x 224, batch 1, with
every tensor channels-last except where NCHW is faster, and the layout changes folded into
copies that are made anyway:

- 3x3 convolutions on channels-last inputs (oneDNN's NHWC kernels: 2x faster at 20 channels);
- reflection padding by one written into a preallocated channels-last tensor with five slice
  copies, and its backward as the interior plus four edge and four corner additions (no flips,
  no concatenation, no NCHW round trip as in `F.pad`);
- the 20-channel merge: the skip and upsampled parts are batch-normalised apart (BatchNorm is
  per channel, so that is the same computation) and written straight into the padded
  convolution input, with no `torch.cat`; the 4-channel skip part stays NCHW, where torch's
  BatchNorm is 3x faster than channels-last at 4 channels;
- 1x1 convolutions as matrix products on the `(H*W) x C` view;
- with `--native`, also with BatchNorm + LeakyReLU and the padding and concatenation in C
  kernels (`native/skipnet_nhwc.c`, built with the system compiler by `native_kernels.py`):
  two passes over the activations each way for BatchNorm, one for the padding, every tensor
  channels-last.

Each variant rounds differently from the shipped network (convolution sums in another order),
so it could only ship after `benchmarks/dip_accuracy.py` on all 100 sample images. Prints the
output and gradient differences, then the timings in interleaved rounds (medians) and their ratios.
Figures: docs/performance.md ("Fourth look").
"""

from __future__ import annotations

import argparse
import statistics
import time

import native_kernels
import torch
import torch.nn.functional as F

from advpurify import heap
from advpurify.models.skipnet import SkipNet, _Scale
from advpurify.purifiers.dip import DipSettings, _step_bytes

NHWC = torch.channels_last


def _layout(t: torch.Tensor) -> torch.memory_format:
    nhwc = t.is_contiguous(memory_format=NHWC) and not t.is_contiguous()
    return NHWC if nhwc else torch.contiguous_format


class ReflectPadConcat(torch.autograd.Function):
    """Reflection padding by one of ``cat(parts, dim=1)``, written into one channels-last tensor."""

    @staticmethod
    def forward(ctx, *parts: torch.Tensor) -> torch.Tensor:
        _, _, h, w = parts[0].shape
        channels = [p.shape[1] for p in parts]
        out = torch.empty(1, sum(channels), h + 2, w + 2, dtype=parts[0].dtype, memory_format=NHWC)
        start = 0
        for part, c in zip(parts, channels, strict=True):
            out[:, start : start + c, 1 : h + 1, 1 : w + 1] = part
            start += c
        # Rows first, then whole columns (corners included): pad 1 needs no flips.
        out[:, :, 0, 1 : w + 1] = out[:, :, 2, 1 : w + 1]
        out[:, :, h + 1, 1 : w + 1] = out[:, :, h - 1, 1 : w + 1]
        out[:, :, :, 0] = out[:, :, :, 2]
        out[:, :, :, w + 1] = out[:, :, :, w - 1]
        ctx.channels = channels
        ctx.layouts = [_layout(p) for p in parts]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = grad.shape[2] - 2, grad.shape[3] - 2
        grads, start = [], 0
        for c, layout in zip(ctx.channels, ctx.layouts, strict=True):
            g = grad[:, start : start + c]
            gx = g[:, :, 1 : h + 1, 1 : w + 1].contiguous(memory_format=layout)
            gx[:, :, :, 1] += g[:, :, 1 : h + 1, 0]
            gx[:, :, :, w - 2] += g[:, :, 1 : h + 1, w + 1]
            gx[:, :, 1, :] += g[:, :, 0, 1 : w + 1]
            gx[:, :, h - 2, :] += g[:, :, h + 1, 1 : w + 1]
            for row, source_row in ((1, 0), (h - 2, h + 1)):  # corners (may coincide)
                for col, source_col in ((1, 0), (w - 2, w + 1)):
                    gx[:, :, row, col] += g[:, :, source_row, source_col]
            grads.append(gx)
            start += c
        return tuple(grads)


def conv1x1(
    x: torch.Tensor, weight: torch.Tensor, bias=None, nhwc_out: bool = True
) -> torch.Tensor:
    """A 1x1 convolution of a batch-1 tensor as one matrix product, output in either layout."""
    _, cin, h, w = x.shape
    cout = weight.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(h * w, cin) if _layout(x) is NHWC else None
    if nhwc_out:
        out = rows @ weight.t() if rows is not None else (weight @ x.reshape(cin, h * w)).t()
        out = out if bias is None else out + bias
        return out.reshape(1, h, w, cout).permute(0, 3, 1, 2)
    out = weight @ rows.t() if rows is not None else weight @ x.reshape(cin, h * w)
    out = out if bias is None else out + bias.unsqueeze(1)
    return out.reshape(1, cout, h, w)


class TorchOps:
    """The channels-last network's BatchNorm and padding from torch ops."""

    name = "channels-last"
    skip_nchw = True  # torch's BatchNorm is 3x slower channels-last at 4 channels
    pad = ReflectPadConcat.apply

    @staticmethod
    def bn(x, bn, act: bool = True, channels: slice = slice(None)) -> torch.Tensor:
        weight, bias = bn.weight[0, channels], bn.bias[0, channels]
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
        return F.leaky_relu(y, 0.2, inplace=True) if act else y


class NativeOps:
    """The same with native kernels (``native_kernels.py``): BatchNorm + LeakyReLU in two
    passes each way, padding and concatenation in one; every tensor channels-last."""

    name = "channels-last, native kernels"
    skip_nchw = False

    @staticmethod
    def pad(*parts: torch.Tensor) -> torch.Tensor:
        return native_kernels.ReflectPadConcat.apply(*parts)

    @staticmethod
    def bn(x, bn, act: bool = True, channels: slice = slice(None)) -> torch.Tensor:
        weight, bias = bn.weight[0, channels], bn.bias[0, channels]
        return native_kernels.BatchNormAct.apply(x, weight, bias, 0.2 if act else 1.0)


def nhwc_scale(scale: _Scale, x: torch.Tensor, ops=TorchOps) -> torch.Tensor:
    deep = ops.bn(F.conv2d(ops.pad(x), scale.down[0].weight[0], stride=2), scale.down[1])
    deep = ops.bn(F.conv2d(ops.pad(deep), scale.down2[0].weight[0]), scale.down2[1])
    if scale.inner is not None:
        deep = nhwc_scale(scale.inner, deep, ops)
    deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=False)
    k = scale.skip_channels
    if scale.skip is None:
        parts = [ops.bn(deep, scale.merge_bn, act=False)]
    else:
        weight = scale.skip[0].weight[0].flatten(1)
        skip = ops.bn(conv1x1(x, weight, nhwc_out=not ops.skip_nchw), scale.skip[1])
        parts = [
            ops.bn(skip, scale.merge_bn, act=False, channels=slice(0, k)),
            ops.bn(deep, scale.merge_bn, act=False, channels=slice(k, None)),
        ]
    up = ops.bn(F.conv2d(ops.pad(*parts), scale.up[0].weight[0]), scale.up[1])
    return ops.bn(conv1x1(up, scale.up1x1[0].weight[0].flatten(1)), scale.up1x1[1])


def nhwc_forward(net: SkipNet, z: torch.Tensor, ops=TorchOps) -> torch.Tensor:
    """What ``net`` (one network) computes for a channels-last ``z``, up to rounding."""
    features = nhwc_scale(net.body, z, ops)
    out = conv1x1(features, net.head.weight[0].flatten(1), net.head.bias[0], nhwc_out=False)
    return torch.sigmoid(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="forward + backward per round")
    parser.add_argument("--native", action="store_true", help="also with the native kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = DipSettings.from_preset("fast")
    print(f"torch {torch.__version__}, {args.threads} threads, heap tuned: {heap.enabled()}")
    heap.reserve(_step_bytes(1, args.size, args.size, settings))
    variants = [TorchOps]
    if args.native:
        try:
            native_kernels.kernels()
            variants.append(NativeOps)
        except RuntimeError as error:
            print(f"native kernels skipped: {error}")

    net = SkipNet(settings.skip_config(), 1, seeds=[0])
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(1)
    z = torch.rand(1, settings.input_depth, args.size, args.size, generator=gen) * 0.1
    z_nhwc = z.contiguous(memory_format=NHWC)
    target = torch.rand(1, 3, args.size, args.size, generator=gen)

    def step(forward, net_input):
        loss = (forward(net_input) - target).square().mean()
        return torch.autograd.grad(loss, params)

    runs = {"shipped (NCHW)": lambda: step(net, z)}
    for ops in variants:
        runs[ops.name] = lambda ops=ops: step(lambda x: nhwc_forward(net, x, ops), z_nhwc)
        with torch.no_grad():
            diff = (net(z) - nhwc_forward(net, z_nhwc, ops)).abs().max().item()
        pairs = zip(net.named_parameters(), step(net, z), runs[ops.name](), strict=True)
        relative = [
            ((a - b).norm() / a.norm()).item()
            for (name, _), a, b in pairs
            if "weight" in name and ".0." in name  # the convolutions (a BN bias before a
            # conv + BN has a true gradient of zero: its "gradient" is rounding noise)
        ]
        print(
            f"{ops.name}: output max abs difference {diff:.2e}; convolution weight gradients "
            f"differ by {statistics.median(relative):.1e} (median) to {max(relative):.1e} "
            "(max), relative"
        )

    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for name, run in runs.items():
            began = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - began) / args.steps * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    shipped = medians["shipped (NCHW)"]
    for name, value in medians.items():
        print(f"{name:30s} {value:6.1f} ms per forward + backward, {shipped / value:.2f}x")


if __name__ == "__main__":
    main()
