"""Building a Caffe-derived network (PPGN's G and E) from random, cached or file weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from advpurify.models.caffe_pixels import mean_image


def build_caffe_model(
    make: Callable[[], nn.Module],
    cached_name: str,
    weights: str | Path | None,
    seed: int,
    random_gain: float,
    expected_shapes: dict[str, tuple[int, ...]],
    convert: Callable[[Path], dict[str, torch.Tensor]],
) -> nn.Module:
    """``weights``: None = the cached ``cached_name``, ``"random"`` = seeded random weights of
    the true shapes (tests, benchmarks), else a weight file converted by ``convert``."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
        # PyTorch's default init shrinks activations layer by layer; this gain keeps them at a
        # realistic magnitude, so benchmarks, exports and parity checks see realistic numbers.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("weight"):
                    param.mul_(random_gain)
        return model.eval()
    if weights is None:
        from advpurify.weights import load_state_dict
        from advpurify.weights.registry import WeightsError

        state = load_state_dict(cached_name)
        bad = [
            k for k, s in expected_shapes.items() if k not in state or tuple(state[k].shape) != s
        ]
        if bad:
            raise WeightsError(f"cached {cached_name} does not match the network ({bad[:3]})")
    else:
        state = convert(Path(weights))
    with torch.device("meta"):
        model = make()
    model.load_state_dict(state, strict=False, assign=True)
    # The mean buffer is not a weight: built on the meta device, it is made here at its size.
    model.mean = mean_image(model.mean.shape[-1])
    return model.eval()
