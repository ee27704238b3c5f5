"""PPGN-h sampling (Nguyen et al. 2017) used as a purifier.

The image is encoded to a CaffeNet fc6 code, h0 = E(x), and the code is moved for ``steps``
iterations along

    d_h = eps1 * (E(G(h)) - h)                 the prior: h -> image -> h "upside-down" autoencoder
        + data_weight * J_G(h)^T (x - G(h))    keeps the generated image near the input
        + N(0, eps3)                           noise, drawn from the image's own seed
    h  <- clip(h + lr_t / mean(|d_h|) * d_h, 0, 30),  lr_t = lr + (lr_end - lr) * t / steps

(no class term: the true class is unknown and the adversarial prediction is wrong). The output
is G(h_T): its 227 x 227 centre, the part E sees, resized back to the input's size. Everything
is computed per image inside the batch (the step normalisation too), so an image's result does
not depend on its batch-mates. Defaults follow the published "sampling from a real image"
settings (200 steps, lr 0.5, eps1 1e-5, eps3 1e-17) and the inpainting context weight (1e-9)
for the data term; G(x)'s pixel scale (0..255) is what these weights were tuned for. The step
size anneals linearly from ``lr`` to ``lr_end`` (0) as the PPGN code's does: a constant step
keeps h_T jittering for ever, and G(h_T) keeps the jitter.

Each run's per-step mean magnitudes of the prior and the data term (per image) are kept in
:attr:`PPGNPurifier.last_run` (a :class:`SamplerRun`): a debug statistic that shows whether the
two weights are balanced for the weights in use.

``stochastic`` is True as a class attribute: with ``eps3 > 0`` the output depends on the seed
(with ``eps3 = 0`` it does not, and the seed is simply unused). ``differentiable`` is False: the
sampler is an iterative loop; attacks go through it with BPDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advpurify.purifiers.base import Purifier, Settings, generators, register, setting

CODE_MAX = 30.0  # the PPGN code's clip range: fc6 after ReLU stays within [0, 30]
# The engine's backends (advpurify.runtime.backends.CHOICES); the sampler loop itself is torch.
END_BACKENDS = ("torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "auto")


@dataclass(frozen=True)
class PPGNSettings(Settings):
    steps: int = setting(200, "sampler iterations", min=0, max=100000)
    lr: float = setting(0.5, "step size (the step is lr / mean|d_h| per image)", min=0.0)
    lr_end: float = setting(0.0, "last step size: lr anneals linearly to it", min=0.0)
    eps1: float = setting(1e-5, "weight of the prior term E(G(h)) - h", min=0.0)
    data_weight: float = setting(1e-9, "weight of the term keeping G(h) near the input", min=0.0)
    eps3: float = setting(1e-17, "standard deviation of the noise added to d_h", min=0.0)
    weights: str = setting(
        "cached", "cached (the weights cache) or random (tests)", choices=("cached", "random")
    )
    backend: str = setting(
        "torch", "runtime of the feed-forward ends E(x) and G(h_T)", choices=END_BACKENDS
    )


@register
class PPGNPurifier(Purifier):
    name = "ppgn"
    description = "PPGN-h sampler: DeePSiM generator prior over CaffeNet fc6 codes"
    Settings = PPGNSettings
    settings: PPGNSettings
    stochastic = True
    differentiable = False

    def __init__(
        self, settings: PPGNSettings | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(settings, device=device)
        if self.settings.weights == "cached":
            # Fail at construction, before a batch run starts, with the commands to run.
            from advpurify.weights import require

            require("deepsim-fc6")
            require("caffenet-fc6")
        self._models: dict[torch.device, tuple[torch.nn.Module, torch.nn.Module]] = {}
        self._ends: dict[torch.device, object] = {}
        self.last_run: SamplerRun | None = None

    def models(self, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(G, E) on ``device``, loaded once; missing weights raise with the commands to run."""
        if device not in self._models:
            from advpurify.models.caffenet import build_encoder
            from advpurify.models.deepsim import build_generator

            weights = "random" if self.settings.weights == "random" else None
            # Ordinary tensors even when first called under inference_mode: the sampler's
            # gradient goes through G.
            with torch.inference_mode(False):
                generator = build_generator(weights).to(device).requires_grad_(False)
                encoder = build_encoder(weights).to(device).requires_grad_(False)
            self._models[device] = (generator, encoder)
        return self._models[device]

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        from advpurify.models.caffe_pixels import caffe_to_rgb01
        from advpurify.models.deepsim import center_crop

        generator, _ = self.models(images.device)
        self.last_run = self.run_sampler(images, seeds)
        with torch.no_grad():
            ends = self._feed_forward(images.device)
            crop = center_crop(ends.generate(self.last_run.codes))
            out = caffe_to_rgb01(crop, center_crop(generator.mean))
            height, width = images.shape[-2:]
            if out.shape[-2:] != (height, width):
                shrink = height < out.shape[-2] or width < out.shape[-1]
                out = F.interpolate(
                    out, size=(height, width), mode="bilinear", align_corners=False,
                    antialias=shrink,
                ).clamp(0.0, 1.0)  # fmt: skip
        return out.to(images.dtype)

    def sample(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The sampler's final codes h_T (``N x 4096``) for [0, 1] RGB ``images``."""
        return self.run_sampler(images, seeds).codes

    def step_size(self, t: int) -> float:
        """Step ``t`` (0-based) of the linear schedule, as the PPGN sampler computes it."""
        lr, lr_end, steps = self.settings.lr, self.settings.lr_end, self.settings.steps
        return lr + (lr_end - lr) * t / steps

    def run_sampler(self, images: torch.Tensor, seeds: Sequence[int]) -> SamplerRun:
        """h_T for [0, 1] RGB ``images``, with the per-step term magnitudes."""
        # The data term needs autograd even when the caller runs under inference_mode (serve
        # does); a clone made here is an ordinary tensor that autograd may record.
        with torch.inference_mode(False):
            return self._run_sampler(images.clone(), seeds)

    def _run_sampler(self, images: torch.Tensor, seeds: Sequence[int]) -> SamplerRun:
        device = images.device
        generator, encoder = self.models(device)
        target = encoder.preprocess(images.float())  # 227 x 227, Caffe pixel space
        h = self._feed_forward(device).encode(target).clamp(0.0, CODE_MAX)
        gens = generators(seeds, device) if self.settings.eps3 > 0 else None
        prior, data = [], []
        for t in range(self.settings.steps):
            h, d_prior, d_data = self._step(h, target, generator, encoder, gens, self.step_size(t))
            # Kept on the device (no per-step host sync); read once at the end.
            prior.append(d_prior.abs().mean(dim=1))
            data.append(d_data.abs().mean(dim=1))
        empty = torch.zeros(0, len(images))
        return SamplerRun(
            codes=h,
            prior_magnitude=torch.stack(prior).cpu() if prior else empty,
            data_magnitude=torch.stack(data).cpu() if data else empty,
            step_sizes=[self.step_size(t) for t in range(self.settings.steps)],
        )

    def _step(self, h, target, generator, encoder, gens, lr: float):
        """One update of h; returns it with the weighted prior and data terms."""
        from advpurify.models.deepsim import center_crop

        with torch.enable_grad():
            code = h.detach().requires_grad_(self.settings.data_weight > 0)
            crop = center_crop(generator.caffe(code))
            if self.settings.data_weight > 0:
                # Summed over the batch: each image's gradient involves only its own code.
                loss = 0.5 * (crop - target).pow(2).sum()
                d_data = -torch.autograd.grad(loss, code)[0]
        with torch.no_grad():
            d_prior = self.settings.eps1 * (encoder.caffe(crop.detach()) - h)
            weight = self.settings.data_weight
            d_data = weight * d_data if weight > 0 else torch.zeros_like(h)
            d_h = d_prior + d_data
            if gens is not None:
                noise = torch.stack(
                    [torch.randn(h.shape[1:], generator=g, device=h.device) for g in gens]
                )
                d_h = d_h + self.settings.eps3 * noise
            scale = d_h.abs().mean(dim=1, keepdim=True)
            step = torch.where(scale > 0, lr / scale.clamp_min(1e-30), torch.zeros_like(scale))
            return (h + step * d_h).clamp(0.0, CODE_MAX), d_prior, d_data

    def _feed_forward(self, device: torch.device):
        """The one-shot ends E(x) and G(h_T): eager torch, or an engine backend."""
        if device not in self._ends:
            generator, encoder = self.models(device)
            if self.settings.backend == "torch":
                self._ends[device] = _TorchEnds(generator, encoder)
            else:
                self._ends[device] = _BackendEnds(generator, encoder, self.settings.backend, device)
        return self._ends[device]


@dataclass
class SamplerRun:
    """One sampler run: the final codes and, per step and image, the mean magnitude of the
    weighted prior term ``eps1 * (E(G(h)) - h)`` and data term (``steps x N``, on the CPU)."""

    codes: torch.Tensor
    prior_magnitude: torch.Tensor
    data_magnitude: torch.Tensor
    step_sizes: list[float]


class _TorchEnds:
    def __init__(self, generator, encoder) -> None:
        self.generator, self.encoder = generator, encoder

    @torch.no_grad()
    def encode(self, caffe_images: torch.Tensor) -> torch.Tensor:
        return self.encoder.caffe(caffe_images)

    @torch.no_grad()
    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        return self.generator.caffe(codes)


class _BackendEnds:
    """E.caffe and G.caffe on an engine backend (ONNX Runtime, TensorRT), exported once."""

    def __init__(self, generator, encoder, backend: str, device: torch.device) -> None:
        from advpurify.runtime.backends import create_backend

        self.encoder = create_backend(
            backend, CaffeEnd(encoder), device=str(device), sample_shape=(3, 227, 227),
            label="ppgn-encoder", notify=None, input_range=(-125.0, 155.0),  # Caffe pixels
        )  # fmt: skip
        self.generator = create_backend(
            backend, CaffeEnd(generator), device=str(device), sample_shape=(4096,),
            label="ppgn-generator", notify=None,
        )  # fmt: skip

    def encode(self, caffe_images: torch.Tensor) -> torch.Tensor:
        return self.encoder.run(caffe_images.contiguous()).clone()  # a normal tensor again

    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        return self.generator.run(codes.contiguous()).clone()


class CaffeEnd(torch.nn.Module):
    """A model's Caffe-space ``caffe`` method as ``forward`` (what the sampler exchanges)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.caffe(x)
