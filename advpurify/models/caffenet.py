"""The BVLC reference CaffeNet up to fc6 after its ReLU: PPGN's encoder E.

CaffeNet is AlexNet as trained by BVLC, with pooling *before* local response normalisation:
conv1 96 k11 s4, pool 3/2, LRN(5, 1e-4, 0.75); conv2 256 k5 p2 (2 groups), pool, LRN; conv3 384
k3 p1; conv4 384 k3 p1 (2 groups); conv5 256 k3 p1 (2 groups), pool; fc6 4096; ReLU after each.
Caffe rounds pooling output sizes up (``ceil_mode``). Input: 227 x 227 BGR, 0..255 minus the
ILSVRC mean image; ``forward`` takes [0, 1] RGB of any size and resizes to 227 x 227.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advpurify.models.caffe_build import build_caffe_model
from advpurify.models.caffe_pixels import mean_image, rgb01_to_caffe
from advpurify.models.spec import ModelSpec, register_model
from advpurify.weights.convert import checked_state, parameter_shapes
from advpurify.weights.registry import Source

INPUT_SIZE = 227
FEATURES = 4096

RANDOM_GAIN = 2.0


class CaffeNetFc6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * 6 * 6, FEATURES)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        # The ILSVRC mean image's 227 x 227 centre, as the PPGN code subtracts it.
        self.register_buffer("mean", mean_image(INPUT_SIZE), persistent=False)

    def caffe(self, images: torch.Tensor) -> torch.Tensor:
        """``N x 3 x 227 x 227`` Caffe-space images -> ``N x 4096`` fc6 after ReLU."""
        x = self.norm(self.pool(F.relu(self.conv1(images))))
        x = self.norm(self.pool(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        return F.relu(self.fc6(x.flatten(1)))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB of any size -> 227 x 227 Caffe-space input.

        Antialiased (as PIL's resize, which the PPGN code used): a large photo shrunk without
        it aliases both E's input and the sampler's data target.
        """
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.interpolate(
                images,
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return rgb01_to_caffe(images, self.mean)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``N x 3 x H x W`` [0, 1] RGB -> ``N x 4096`` fc6 codes (after ReLU)."""
        return self.caffe(self.preprocess(images))


@lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    return parameter_shapes(CaffeNetFc6)


def convert_weights(path: Path) -> dict[str, torch.Tensor]:
    """bvlc_reference_caffenet.caffemodel, a .pt port or a converted .safetensors -> fc6 state
    dict (fc7 and fc8, which E does not use, are dropped)."""
    return checked_state(Path(path), expected_shapes())


def build_encoder(weights: str | Path | None = None, seed: int = 0) -> CaffeNetFc6:
    """E with ``weights``: None = the cached ``caffenet-fc6``, ``"random"`` = seeded random
    weights of the true shapes, else a weight file."""
    return build_caffe_model(
        CaffeNetFc6, "caffenet-fc6", weights, seed, RANDOM_GAIN, expected_shapes(), convert_weights
    )


SPEC = register_model(
    ModelSpec(
        name="caffenet-fc6",
        builder=build_encoder,
        description="PPGN encoder E (BVLC reference CaffeNet to fc6 + ReLU): [0, 1] RGB -> "
        "4096-d code",
        sample_shape=(3, INPUT_SIZE, INPUT_SIZE),
        output="features",
        sources=(
            Source(
                name="caffenet-fc6-caffe",
                provides="caffenet-fc6",
                format="caffemodel",
                url="http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
                sha1="4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46",  # the Caffe model zoo's readme
                converter=convert_weights,
                description="bvlc_reference_caffenet.caffemodel (BVLC model zoo)",
            ),
            Source(
                name="caffenet-fc6-torch",
                provides="caffenet-fc6",
                format="torch",
                url="https://huggingface.co/binxu/DeePSim_DosovitskiyBrox2016/resolve/main/caffenet.pt",
                converter=convert_weights,
                description="PyTorch port of CaffeNet (binxu/DeePSim_DosovitskiyBrox2016)",
            ),
            Source(
                name="caffenet-fc6-safetensors",
                provides="caffenet-fc6",
                format="safetensors",
                converter=convert_weights,
                description="a file written by `advpurify weights convert`",
            ),
        ),
    )
)
