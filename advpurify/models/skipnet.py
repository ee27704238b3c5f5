"""The "skip" encoder-decoder of Deep Image Prior (Ulyanov et al.), as N independent networks.

Every layer holds the weights of ``n_nets`` networks stacked along a leading dimension: the
activations of network ``i`` are channels ``[i*C, (i+1)*C)`` of a single ``1 x (N*C) x H x W``
tensor. Convolutions run as one grouped convolution (CUDA) or one conv per network (CPU, where
oneDNN's grouped conv is slower and rounds differently from a single net's). BatchNorm over such
a tensor normalises each channel over H x W only, which is exactly the per-network BatchNorm of
a net fed one image, so N nets in one module compute what N separate modules would, in one pass.

The structure follows ``models/skip.py`` of the reference code: per scale, a skip branch
(1x1 conv, BN, LeakyReLU) beside a deeper branch (stride-2 3x3 conv, BN, act, 3x3 conv, BN, act,
the next scale, bilinear x2 upsampling), concatenated, then BN, 3x3 conv, BN, act, 1x1 conv, BN,
act; a final 1x1 conv to 3 channels and a sigmoid. Reflection padding throughout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class SkipConfig:
    """Shape of one skip network. The defaults are the paper's denoising configuration."""

    input_depth: int = 32
    channels_down: tuple[int, ...] = (128,) * 5
    channels_up: tuple[int, ...] = (128,) * 5
    channels_skip: tuple[int, ...] = (4,) * 5
    output_channels: int = 3

    def __post_init__(self) -> None:
        n = len(self.channels_down)
        if n == 0 or len(self.channels_up) != n or len(self.channels_skip) != n:
            raise ValueError(
                "channels_down, channels_up and channels_skip need one entry per scale"
            )

    @property
    def scales(self) -> int:
        return len(self.channels_down)

    @classmethod
    def uniform(
        cls, scales: int = 5, channels: int = 128, skip_channels: int = 4, input_depth: int = 32
    ) -> SkipConfig:
        return cls(
            input_depth=input_depth,
            channels_down=(channels,) * scales,
            channels_up=(channels,) * scales,
            channels_skip=(skip_channels,) * scales,
        )


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection padding; on CUDA built from slices, whose backward is deterministic."""
    if not x.is_cuda:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return reflect_pad_slices(x, pad)


def reflect_pad_slices(x: torch.Tensor, pad: int) -> torch.Tensor:
    for dim in (x.ndim - 1, x.ndim - 2):
        n = x.shape[dim]
        before = x.narrow(dim, 1, pad).flip(dim)
        after = x.narrow(dim, n - 1 - pad, pad).flip(dim)
        x = torch.cat([before, x, after], dim=dim)
    return x


def _upsample_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    # Bilinear x2 (align_corners=False) along one axis: out[2k] = .25 x[k-1] + .75 x[k],
    # out[2k+1] = .75 x[k] + .25 x[k+1], edges replicated.
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim=dim)
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim=dim)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    shape = list(x.shape)
    shape[dim] = 2 * n
    return torch.stack([even, odd], dim=dim + 1).reshape(shape)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling; on CUDA without the atomics of ``F.interpolate``'s backward."""
    if not x.is_cuda:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return _upsample_axis(_upsample_axis(x, x.ndim - 2), x.ndim - 1)


Parts = list[torch.Tensor]
"""Activations of all nets: one ``1 x (N*C) x H x W`` tensor, or one ``1 x C x H x W`` per net."""


def _uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


class GroupConv(nn.Module):
    """``n_nets`` independent k x k convolutions (reflection padded), grouped or one per net."""

    def __init__(
        self,
        n_nets: int,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        bias: bool = True,
        **factory,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride = cin, cout, kernel, stride
        self.weight = nn.Parameter(torch.empty(n_nets, cout, cin, kernel, kernel, **factory))
        self.bias = nn.Parameter(torch.empty(n_nets, cout, **factory)) if bias else None

    def reset_parameters(self, index: int, generator: torch.Generator | None) -> None:
        # torch's Conv2d default (kaiming_uniform with a=sqrt(5)): bound = 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(self.cin * self.kernel * self.kernel)
        _uniform_(self.weight[index], bound, generator)
        if self.bias is not None:
            _uniform_(self.bias[index], bound, generator)

    matmul_1x1 = True
    """Per-net 1x1 convolutions as one matrix product each (the same sums, in the same order as
    the conv kernels on the CPU, tested bit-identical), skipping the convolution dispatch."""

    def forward(self, xs: Parts) -> Parts:
        n = self.weight.shape[0]
        pad = (self.kernel - 1) // 2
        if (
            self.kernel == 1
            and self.stride == 1
            and self.matmul_1x1
            and len(xs) == n
            and not xs[0].is_cuda
        ):
            return [self._matmul(x, i) for i, x in enumerate(xs)]
        if len(xs) == 1:  # all nets in one tensor: one grouped conv
            weight = self.weight.reshape(n * self.cout, self.cin, self.kernel, self.kernel)
            bias = None if self.bias is None else self.bias.reshape(-1)
            x = reflect_pad(xs[0], pad) if pad else xs[0]
            return [F.conv2d(x, weight, bias, stride=self.stride, groups=n)]
        biases = [None] * n if self.bias is None else self.bias.unbind(0)
        return [
            F.conv2d(reflect_pad(x, pad) if pad else x, weight, bias, stride=self.stride)
            for x, weight, bias in zip(xs, self.weight.unbind(0), biases, strict=True)
        ]

    def _matmul(self, x: torch.Tensor, net: int) -> torch.Tensor:
        _, cin, h, w = x.shape
        out = torch.mm(self.weight[net].reshape(self.cout, cin), x.reshape(cin, h * w))
        if self.bias is not None:
            out = out + self.bias[net].unsqueeze(1)
        return out.reshape(1, self.cout, h, w)


class GroupBatchNorm(nn.Module):
    """BatchNorm with batch statistics of ``n_nets`` networks, each fed a single image."""

    def __init__(self, n_nets: int, channels: int, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_nets, channels, **factory))
        self.bias = nn.Parameter(torch.zeros(n_nets, channels, **factory))

    def reset_parameters(self, index: int, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            self.weight[index].fill_(1.0)
            self.bias[index].zero_()

    def forward(self, xs: Parts) -> Parts:
        # DIP always normalises with the current statistics (the net never leaves train mode).
        if len(xs) == 1:
            weights, biases = [self.weight.reshape(-1)], [self.bias.reshape(-1)]
        else:
            weights, biases = self.weight.unbind(0), self.bias.unbind(0)
        return [
            F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
            for x, w, b in zip(xs, weights, biases, strict=True)
        ]


def _block(n: int, cin: int, cout: int, kernel: int, stride: int = 1, **factory) -> nn.ModuleList:
    # No conv bias before BatchNorm: BN cancels it exactly, so its true gradient is zero, and
    # Adam would turn the rounding noise of that gradient into full-size steps (+-lr), making
    # fits chaotically sensitive to float rounding. Same function as the reference net.
    conv = GroupConv(n, cin, cout, kernel, stride, bias=False, **factory)
    return nn.ModuleList([conv, GroupBatchNorm(n, cout, **factory)])


class _Scale(nn.Module):
    """One scale of the skip net; ``inner`` is the next (coarser) scale or None at the bottom."""

    def __init__(
        self, n: int, config: SkipConfig, level: int, cin: int, inner: _Scale | None, **factory
    ) -> None:
        super().__init__()
        down = config.channels_down[level]
        skip = config.channels_skip[level]
        up = config.channels_up[level]
        self.skip_channels = skip
        self.skip = _block(n, cin, skip, 1, **factory) if skip else None
        self.down = _block(n, cin, down, 3, 2, **factory)
        self.down2 = _block(n, down, down, 3, **factory)
        self.inner = inner
        deep = config.channels_up[level + 1] if inner is not None else down
        self.deep_channels = deep
        self.merge_bn = GroupBatchNorm(n, skip + deep, **factory)
        self.up = _block(n, skip + deep, up, 3, **factory)
        self.up1x1 = _block(n, up, up, 1, **factory)

    @staticmethod
    def _run(block: nn.ModuleList, xs: Parts) -> Parts:
        # In place on BatchNorm's fresh output (its backward needs only the sign, kept).
        return [F.leaky_relu(x, 0.2, inplace=True) for x in block[1](block[0](xs))]

    def forward(self, xs: Parts) -> Parts:
        deep = self._run(self.down2, self._run(self.down, xs))
        if self.inner is not None:
            deep = self.inner(deep)
        deep = [upsample2x(d) for d in deep]
        if self.skip is not None:
            skips = self._run(self.skip, xs)
            deep = [self._concat(s, d) for s, d in zip(skips, deep, strict=True)]
        return self._run(self.up1x1, self._run(self.up, self.merge_bn(deep)))

    def _concat(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        # Per network: [skip_i, deep_i] for each net i, not [all skips, all deeps].
        k = skip.shape[1] // self.skip_channels  # nets in this part
        if k == 1:
            return torch.cat([skip, deep], dim=1)
        h, w = deep.shape[-2:]
        return torch.cat(
            [skip.reshape(k, self.skip_channels, h, w), deep.reshape(k, self.deep_channels, h, w)],
            dim=1,
        ).reshape(1, -1, h, w)


class SkipNet(nn.Module):
    """``n_nets`` skip networks; ``forward`` maps N x input_depth x H x W to N x 3 x H x W.

    Image ``i`` of the input goes through network ``i`` only. H and W must be multiples of
    ``2 ** config.scales``. The number of networks is read from the weights, so a dict of
    weights sliced along their first dimension (``torch.func.functional_call``) runs a subset.
    """

    def __init__(
        self,
        config: SkipConfig = SkipConfig(),
        n_nets: int = 1,
        seeds: Sequence[int | torch.Generator] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # None: one grouped conv for all nets on CUDA; on CPU one conv per net, as oneDNN's
        # grouped conv is slower there (benchmarks/bench_dip.py) and rounds differently from a
        # single net's conv (per-net convs keep a batch bit-identical to one-by-one fits).
        self.grouped: bool | None = None
        factory = {"device": device, "dtype": torch.float32}
        inner: _Scale | None = None
        for level in reversed(range(config.scales)):
            cin = config.input_depth if level == 0 else config.channels_down[level - 1]
            inner = _Scale(n_nets, config, level, cin, inner, **factory)
        assert inner is not None
        self.body = inner
        self.head = GroupConv(n_nets, config.channels_up[0], config.output_channels, 1, **factory)
        self.reset_parameters(seeds if seeds is not None else [None] * n_nets)

    def set_grouped(self, grouped: bool | None) -> None:
        """Force one grouped conv (True) or one conv per net (False); None picks by device."""
        self.grouped = grouped

    @property
    def n_nets(self) -> int:
        return self.head.weight.shape[0]

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 2**self.config.scales

    def reset_parameters(self, seeds: Sequence[int | torch.Generator | None]) -> None:
        """Initialise network ``i`` from ``seeds[i]`` alone (an int, a generator or None)."""
        if len(seeds) != self.n_nets:
            raise ValueError(f"{len(seeds)} seeds for {self.n_nets} networks")
        layers = [m for m in self.modules() if isinstance(m, GroupConv | GroupBatchNorm)]
        for index, seed in enumerate(seeds):
            gen = seed
            if isinstance(seed, int):
                gen = torch.Generator(device=self.head.weight.device)
                gen.manual_seed(seed)
            for layer in layers:  # module order is fixed, so the draw order is too
                layer.reset_parameters(index, gen)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, _, h, w = z.shape
        if n != self.n_nets:
            raise ValueError(f"{n} inputs for {self.n_nets} networks")
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"input {h}x{w} is not a multiple of {self.multiple}")
        grouped = z.is_cuda if self.grouped is None else self.grouped
        # One part holding all nets (grouped convs) or one part per net (plain convs).
        parts = [z.reshape(1, -1, h, w)] if grouped or n == 1 else list(z.split(1))
        out = torch.cat(self.head(self.body(parts)))
        return torch.sigmoid(out).reshape(n, self.config.output_channels, h, w)
