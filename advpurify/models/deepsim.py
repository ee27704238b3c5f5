"""The DeePSiM fc6 generator G (Dosovitskiy & Brox 2016), PPGN's image prior.

G maps a 4096-d CaffeNet fc6 code to a 256 x 256 image: three 4096-unit fully connected layers,
a reshape to 256 x 4 x 4, then transposed convolutions up to 3 x 256 x 256, LeakyReLU(0.3) after
every layer but the last. Its output lives in Caffe's pixel space (BGR, 0..255, the ILSVRC mean
image subtracted); :meth:`DeePSiMGenerator.caffe` returns that raw output, ``forward`` the
project's [0, 1] RGB. Layer names are the Caffe ones, so a ``.caffemodel`` maps one to one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from advpurify.models.caffe_build import build_caffe_model
from advpurify.models.caffe_pixels import caffe_to_rgb01, crop_offset, mean_image
from advpurify.models.spec import ModelSpec, register_model
from advpurify.weights.convert import checked_state, parameter_shapes
from advpurify.weights.registry import Source

CODE_SIZE = 4096
OUTPUT_SIZE = 256
CROP_SIZE = 227  # what CaffeNet sees: the centre of G's output
CROP_OFFSET = crop_offset(CROP_SIZE, OUTPUT_SIZE)  # (256 - 227) // 2 = 14, as in the PPGN code
NEGATIVE_SLOPE = 0.3

# (Caffe layer name, in channels, out channels, kernel, stride, padding): all Deconvolution.
DECONVS = (
    ("deconv5", 256, 256, 4, 2, 1),  # 4 -> 8
    ("conv5_1", 256, 512, 3, 1, 1),
    ("deconv4", 512, 256, 4, 2, 1),  # 8 -> 16
    ("conv4_1", 256, 256, 3, 1, 1),
    ("deconv3", 256, 128, 4, 2, 1),  # 16 -> 32
    ("conv3_1", 128, 128, 3, 1, 1),
    ("deconv2", 128, 64, 4, 2, 1),  # 32 -> 64
    ("deconv1", 64, 32, 4, 2, 1),  # 64 -> 128
    ("deconv0", 32, 3, 4, 2, 1),  # 128 -> 256, linear
)
FCS = ("defc7", "defc6", "defc5")

# Layer names of the PyTorch port (binxu/DeePSim, ``DeePSiMFc6``) -> the Caffe names.
PORT_ALIASES = {
    "deconv5_0": "deconv5",
    "deconv5_1": "conv5_1",
    "deconv4_0": "deconv4",
    "deconv4_1": "conv4_1",
    "deconv3_0": "deconv3",
    "deconv3_1": "conv3_1",
}

RANDOM_GAIN = 3.0
HF_DEEPSIM = "https://huggingface.co/binxu/DeePSim_DosovitskiyBrox2016/resolve/main"


class DeePSiMGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in FCS:
            self.add_module(name, nn.Linear(CODE_SIZE, CODE_SIZE))
        for name, cin, cout, kernel, stride, pad in DECONVS:
            self.add_module(name, nn.ConvTranspose2d(cin, cout, kernel, stride, pad))
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.register_buffer("mean", mean_image(OUTPUT_SIZE), persistent=False)

    def caffe(self, codes: torch.Tensor) -> torch.Tensor:
        """``N x 4096`` codes -> ``N x 3 x 256 x 256`` BGR, 0..255, mean subtracted."""
        x = codes
        for name in FCS:
            x = self.act(getattr(self, name)(x))
        x = x.reshape(-1, 256, 4, 4)
        for name, *_ in DECONVS[:-1]:
            x = self.act(getattr(self, name)(x))
        return self.deconv0(x)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """``N x 4096`` codes -> ``N x 3 x 256 x 256`` RGB images in [0, 1]."""
        return caffe_to_rgb01(self.caffe(codes), self.mean)


def center_crop(images: torch.Tensor) -> torch.Tensor:
    """G's 256 x 256 output -> the 227 x 227 centre CaffeNet sees (offset 14)."""
    o = CROP_OFFSET
    return images[..., o : o + CROP_SIZE, o : o + CROP_SIZE]


@lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    return parameter_shapes(DeePSiMGenerator)


def convert_weights(path: Path) -> dict[str, torch.Tensor]:
    """generator.caffemodel, the PyTorch port (.pt) or a converted .safetensors -> state dict."""
    return checked_state(Path(path), expected_shapes(), aliases=PORT_ALIASES)


def build_generator(weights: str | Path | None = None, seed: int = 0) -> DeePSiMGenerator:
    """G with ``weights``: None = the cached ``deepsim-fc6``, ``"random"`` = seeded random
    weights of the true shapes, else a weight file."""
    return build_caffe_model(
        DeePSiMGenerator,
        "deepsim-fc6",
        weights,
        seed,
        RANDOM_GAIN,
        expected_shapes(),
        convert_weights,
    )


# None of the PPGN files could be downloaded on the machines this project was built on, so their
# sizes and SHA-256 sums are unknown; the layer-by-layer shape check of the converter guards them.
SPEC = register_model(
    ModelSpec(
        name="deepsim-fc6",
        builder=build_generator,
        description="PPGN generator G (DeePSiM fc6, Dosovitskiy & Brox 2016): fc6 code -> "
        "256x256 [0, 1] RGB",
        sample_shape=(CODE_SIZE,),
        output="image",
        images=False,
        input_range=(0.0, 8.0),
        sources=(
            Source(
                name="deepsim-fc6-caffe",
                provides="deepsim-fc6",
                format="caffemodel",
                url="http://s.anhnguyen.me/181007__generator.caffemodel",
                filename="generator.caffemodel",
                converter=convert_weights,
                description="generator.caffemodel (Evolving-AI-Lab/ppgn, noiseless PPGN-h)",
            ),
            Source(
                name="deepsim-fc6-torch",
                provides="deepsim-fc6",
                format="torch",
                url=f"{HF_DEEPSIM}/upconvGAN_fc6.pt",
                converter=convert_weights,
                description="PyTorch port (binxu/DeePSim_DosovitskiyBrox2016); equality to "
                "PPGN's generator unverified",
            ),
            Source(
                name="deepsim-fc6-safetensors",
                provides="deepsim-fc6",
                format="safetensors",
                converter=convert_weights,
                description="a file written by `advpurify weights convert`",
            ),
        ),
    )
)
