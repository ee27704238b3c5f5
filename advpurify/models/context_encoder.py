"""The Context Encoder (Pathak et al. 2016): centre-inpainting generator and its discriminator.

The generator sees a 128 x 128 context whose inner 56 x 56 ([36:92]) is replaced by the mean
colour and predicts the 64 x 64 centre ([32:96]): the 4 pixels around the hole ("overlap") are
predicted too, so that a pasted prediction blends into its surroundings. The networks work in
[-1, 1]; :class:`ContextEncoder` wraps them so that callers pass and receive [0, 1] RGB.

Layer names follow the Torch7 ``nn.Sequential`` of the reference ``train.lua`` so that the
released ``imagenet_inpaintCenter.t7`` maps onto them one to one (:func:`generator_from_t7`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpurify.errors import first_line
from advpurify.models.spec import ModelSpec, register_model
from advpurify.weights import cache, torch7
from advpurify.weights.manager import import_file
from advpurify.weights.registry import Source, WeightsError, model_names
from advpurify.weights.state_dicts import read_state_dict

MODEL_NAME = "context-encoder-imagenet"  # the released Torch7 model, once imported
FINE_SIZE = 128  # context side
CENTER = 64  # predicted centre side
OVERLAP = 4  # predicted border around the hole, weighted 10x in the L2 loss
CENTER_START = (FINE_SIZE - CENTER) // 2  # 32
HOLE_START = CENTER_START + OVERLAP  # 36
HOLE_END = CENTER_START + CENTER - OVERLAP  # 92
# The hole fill of the reference code, channel by channel (R, G, B), in [-1, 1].
MEAN_FILL = (2 * 117.0 / 255.0 - 1.0, 2 * 104.0 / 255.0 - 1.0, 2 * 123.0 / 255.0 - 1.0)


@dataclasses.dataclass(frozen=True)
class CESize:
    """Widths of the networks: encoder, decoder and discriminator base widths, bottleneck."""

    nef: int
    ngf: int
    ndf: int
    bottleneck: int


SIZES = {
    "paper": CESize(nef=64, ngf=64, ndf=64, bottleneck=4000),  # about 71 M parameters in G
    "small": CESize(nef=16, ngf=16, ndf=16, bottleneck=256),  # for quick runs and tests
}


def _down(cin: int, cout: int, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _up(cin: int, cout: int, stride: int = 2, padding: int = 1) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(cin, cout, 4, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class Generator(nn.Module):
    """netG in [-1, 1]: 3 x 128 x 128 context (hole already filled) -> 3 x 64 x 64 centre."""

    def __init__(self, nef: int = 64, ngf: int = 64, bottleneck: int = 4000) -> None:
        super().__init__()
        self.nef, self.ngf, self.bottleneck = nef, ngf, bottleneck
        # Convolutions followed by BatchNorm have no bias (it would be absorbed by the norm);
        # the reference initialises them without one too.
        self.encoder = nn.Sequential(
            *_down(3, nef, norm=False),  # 64 x 64
            *_down(nef, nef, norm=True),  # 32 x 32
            *_down(nef, nef * 2, norm=True),  # 16 x 16
            *_down(nef * 2, nef * 4, norm=True),  # 8 x 8
            *_down(nef * 4, nef * 8, norm=True),  # 4 x 4
            nn.Conv2d(nef * 8, bottleneck, 4, 1, 0, bias=False),  # bottleneck x 1 x 1
        )
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(bottleneck),
            nn.LeakyReLU(0.2, inplace=True),
            *_up(bottleneck, ngf * 8, stride=1, padding=0),  # 4 x 4
            *_up(ngf * 8, ngf * 4),  # 8 x 8
            *_up(ngf * 4, ngf * 2),  # 16 x 16
            *_up(ngf * 2, ngf),  # 32 x 32
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=True),  # 64 x 64
            nn.Tanh(),
        )
        init_weights(self)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(context))


class Discriminator(nn.Module):
    """netD in [-1, 1]: 3 x 64 x 64 centre -> one logit per image (real vs inpainted)."""

    def __init__(self, ndf: int = 64) -> None:
        super().__init__()
        self.ndf = ndf
        self.net = nn.Sequential(
            *_down(3, ndf, norm=False),  # 32 x 32
            *_down(ndf, ndf * 2, norm=True),  # 16 x 16
            *_down(ndf * 2, ndf * 4, norm=True),  # 8 x 8
            *_down(ndf * 4, ndf * 8, norm=True),  # 4 x 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=True),  # 1 x 1
        )
        init_weights(self)

    def forward(self, center: torch.Tensor) -> torch.Tensor:
        # Logits, not probabilities: BCE-with-logits is stable under mixed precision.
        return self.net(center).flatten(1)[:, 0]


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation, as in the reference: N(0, 0.02) convs, N(1, 0.02) norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def fill_hole(context: torch.Tensor) -> torch.Tensor:
    """Replace the inner 56 x 56 of ``N x 3 x 128 x 128`` contexts in [-1, 1] by the mean colour.

    Written as a multiply-add with constant masks (no in-place slice assignment) so that the
    operation exports to ONNX and keeps gradients for the context pixels.
    """
    keep = torch.ones(1, 1, FINE_SIZE, FINE_SIZE, dtype=context.dtype, device=context.device)
    keep[..., HOLE_START:HOLE_END, HOLE_START:HOLE_END] = 0
    fill = torch.tensor(MEAN_FILL, dtype=context.dtype, device=context.device).view(1, 3, 1, 1)
    return context * keep + fill * (1 - keep)


class ContextEncoder(nn.Module):
    """The generator wrapped for [0, 1] RGB: ``N x 3 x 128 x 128`` -> ``N x 3 x 64 x 64``.

    The output is the predicted centre ``[32:96, 32:96]`` of the input, in [0, 1]. Whatever the
    input holds in the hole is ignored (it is replaced by the mean colour first).
    """

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        context = fill_hole(images * 2 - 1)
        return (self.generator(context) + 1) / 2


def build_generator(size: str | CESize = "paper") -> Generator:
    spec = SIZES[size] if isinstance(size, str) else size
    return Generator(spec.nef, spec.ngf, spec.bottleneck)


def build_discriminator(size: str | CESize = "paper") -> Discriminator:
    spec = SIZES[size] if isinstance(size, str) else size
    return Discriminator(spec.ndf)


def generator_from_state_dict(state: dict[str, torch.Tensor]) -> Generator:
    """A generator whose widths are read off the tensors' shapes, with ``state`` loaded."""
    try:
        nef = state["encoder.0.weight"].shape[0]
        bottleneck = state["encoder.14.weight"].shape[0]
        ngf = state["decoder.2.weight"].shape[1] // 8
    except KeyError as error:
        raise ValueError(f"not a context encoder generator state (missing {error})") from None
    generator = Generator(nef=nef, ngf=ngf, bottleneck=bottleneck)
    generator.load_state_dict(state)
    return generator


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_generator(spec: str, device: str | torch.device = "cpu") -> Generator:
    """A generator in eval mode from a checkpoint/weights file or a cached weights name.

    ``spec`` is a training checkpoint written by ``advpurify train context-encoder`` (``.pt``),
    a ``.safetensors`` state dict, a Torch7 ``.t7`` netG, or the name of converted weights in
    the cache (``context-encoder-imagenet``).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".t7":
            state = convert_state(path)
        else:  # a training checkpoint holds the generator under "G"
            state = read_state_dict(path, nested=("G", "state_dict"))
    elif path.suffix or "/" in spec:
        raise WeightsError(f"{spec}: no such weights file")
    else:
        if spec != MODEL_NAME and spec not in model_names():
            raise WeightsError(f"weights {spec!r}: neither a file nor a known model ({MODEL_NAME})")
        try:
            state = cache.load_state_dict(spec)
        except cache.WeightsNotFound as error:
            raise cache.WeightsNotFound(
                f"{error}, or train a generator (`advpurify train context-encoder --data DIR "
                f"-o ce.pt`) and give it as the weights setting (`-p weights=ce.pt`, or "
                f"`--param context-encoder.weights=ce.pt` in experiment)"
            ) from None
    try:
        generator = generator_from_state_dict(state)
    except (ValueError, RuntimeError) as error:
        raise WeightsError(
            f"{spec}: not a context encoder generator ({first_line(error)})"
        ) from None
    return generator.to(device).eval()


DEFAULT_WEIGHTS = MODEL_NAME


def build_context_encoder(weights: str | None = None) -> ContextEncoder:
    """The [0, 1] wrapper around a generator: ``weights`` None (the imported ImageNet model),
    ``"random"`` (paper-size architecture, DCGAN init), a file or a cached name."""
    if weights == "random":
        return ContextEncoder(build_generator("paper")).eval()
    return ContextEncoder(load_generator(weights or DEFAULT_WEIGHTS)).eval()


def generator_from_t7(obj: Any, source: str = "<t7>") -> Generator:
    """Map a Torch7 netG (as read by :func:`advpurify.weights.torch7.read_t7`) onto a new
    :class:`Generator`, its widths read off the file's first and last layers."""
    t7_modules = torch7.inference_modules(obj)
    kinds = [torch7.type_name(m) for m in t7_modules]
    convs = [m for m, k in zip(t7_modules, kinds, strict=True) if k == "nn.SpatialConvolution"]
    full = [m for m, k in zip(t7_modules, kinds, strict=True) if k == "nn.SpatialFullConvolution"]
    if len(convs) != 6 or len(full) != 5:
        raise torch7.Torch7Error(
            f"{source}: {len(convs)} convolutions and {len(full)} full convolutions, "
            "a context encoder has 6 and 5"
        )
    weights = [torch7.field(m, "weight") for m in (convs[0], convs[-1], full[0])]
    if any(w is None or getattr(w, "size", 0) == 0 for w in weights):
        raise torch7.Torch7Error(f"{source}: convolution without weight")
    generator = Generator(
        nef=weights[0].shape[0], ngf=weights[2].shape[1] // 8, bottleneck=weights[1].shape[0]
    )
    ours = [m for m in generator.modules() if type(m) in torch7.EXPECTED]
    torch7.load_modules(t7_modules, ours, source)
    return generator.eval()


def convert_state(path: Path | str) -> dict[str, torch.Tensor]:
    """Weights-registry converter: a Torch7 context encoder file -> the generator's state dict."""
    path = Path(path)
    return generator_from_t7(torch7.read_t7(path), source=str(path)).state_dict()


def convert_t7(source: Path | str, model: str = MODEL_NAME) -> Path:
    """Import a Torch7 context encoder into the weights cache (once) as ``model``: the same path
    as ``advpurify weights import context-encoder-imagenet FILE.t7``."""
    [(_, path)] = import_file(model, Path(source))
    return path


SPEC = register_model(
    ModelSpec(
        name="context-encoder",
        builder=build_context_encoder,
        description="Context Encoder generator (Pathak et al. 2016): 128x128 context -> 64x64 "
        "centre, [0, 1] RGB",
        sample_shape=(3, FINE_SIZE, FINE_SIZE),
        output="image",
        weights_name=MODEL_NAME,
        sources=(
            Source(
                name=MODEL_NAME,
                format="torch7",
                url=None,  # the published archive's link is dead: import only
                filename="imagenet_inpaintCenter.t7",
                converter=convert_state,
                description="Context Encoder generator trained on ImageNet, released as "
                "imagenet_inpaintCenter.t7; import a copy with `weights import`",
            ),
        ),
    )
)
