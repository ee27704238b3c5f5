"""Gradient attacks on ``[0, 1]`` images: FGSM, I-FGSM, PGD; with BPDA + EOT through a purifier.

``eps`` and ``step_size`` are in 1/255 units (``eps=16`` moves each pixel by at most 16/255).

Adaptive evaluation (Athalye, Carlini & Wagner 2018): an attacker who knows the defence attacks
``classifier(purifier(x))``. Where the purifier is differentiable its true gradient is used;
where it is not (JPEG, bit depth, median, DIP...), BPDA uses the purifier in the forward pass and
the identity in the backward pass. For a stochastic purifier, EOT averages the gradient over
``eot`` draws, each with fresh seeds that differ from the seeds the defence uses at test time.

:class:`DefendedClassifier` packs ``classifier(purifier(x))`` with that gradient and EOT into one
``nn.Module``, so torchattacks, AutoAttack or any torch attack code can attack the defence too.

Every image's attack depends only on that image, its label and its seed: losses are summed per
image and models run in eval mode, so batch composition never changes a result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.purifiers.base import Purifier, check_seeds, generators, image_seed

ATTACKS = ("fgsm", "ifgsm", "pgd")


class AttackError(AdvpurifyError, ValueError):
    """An unknown attack or a parameter out of range."""


@dataclass(frozen=True)
class AttackConfig:
    """What to run. ``None`` fields take the attack's usual default (see :meth:`resolved`)."""

    name: str = "fgsm"
    eps: float = 16.0  # in 1/255
    steps: int | None = None
    step_size: float | None = None  # in 1/255
    random_start: bool | None = None
    targeted: bool = False
    eot: int = 1  # gradient draws per step through a stochastic purifier

    def resolved(self) -> AttackConfig:
        """Check every value and fill in the defaults."""
        self._check_types()
        name = self.name.lower().replace("-", "").replace("_", "")
        if name not in ATTACKS:
            raise AttackError(f"unknown attack {self.name!r} (attacks: {', '.join(ATTACKS)})")
        eps = float(self.eps)
        if not (0.0 < eps <= 255.0) or math.isnan(eps):
            raise AttackError(f"eps={self.eps:g}: must be in (0, 255] (units of 1/255)")
        if self.eot < 1:
            raise AttackError(f"eot={self.eot}: must be >= 1")
        if name == "fgsm":
            # One step of size eps: other values would be ignored, so they are refused.
            given = [
                option
                for option, value, own in (
                    ("steps", self.steps, 1),
                    ("step size", self.step_size, eps),
                    ("random start", self.random_start, False),
                )
                if value is not None and value != own
            ]
            if given:
                raise AttackError(
                    f"fgsm is one step of size eps: {', '.join(given)} apply to ifgsm and pgd"
                )
            steps, step_size, random_start = 1, eps, False
        elif name == "ifgsm":
            # Kurakin et al. 2017: alpha = 1/255, min(eps + 4, 1.25 eps) iterations.
            steps = math.ceil(min(eps + 4, 1.25 * eps)) if self.steps is None else self.steps
            step_size = self.step_size if self.step_size is not None else 1.0
            random_start = bool(self.random_start)
        else:  # pgd (Madry et al. 2018): random start, alpha = 2.5 eps / steps
            steps = 10 if self.steps is None else self.steps
            step_size = self.step_size if self.step_size is not None else 2.5 * eps / max(steps, 1)
            random_start = True if self.random_start is None else self.random_start
        if steps < 1:
            raise AttackError(f"steps={steps}: must be >= 1")
        if not 0 < step_size < math.inf:
            raise AttackError(f"step size {step_size:g}: must be a finite number > 0")
        return replace(
            self,
            name=name,
            eps=eps,
            steps=steps,
            step_size=float(step_size),
            random_start=random_start,
        )

    def _check_types(self) -> None:
        # A string or a float where an int belongs would be taken silently, or fail later.
        def number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        wrong = [
            f"{field}={value!r}"
            for field, value, ok in (
                ("name", self.name, isinstance(self.name, str)),
                ("eps", self.eps, number(self.eps)),
                ("steps", self.steps, self.steps is None or type(self.steps) is int),
                ("step_size", self.step_size, self.step_size is None or number(self.step_size)),
                ("random_start", self.random_start, self.random_start in (None, True, False)),
                ("targeted", self.targeted, isinstance(self.targeted, bool)),
                ("eot", self.eot, type(self.eot) is int),
            )
            if not ok
        ]
        if wrong:
            raise AttackError(f"attack settings of the wrong type: {', '.join(wrong)}")

    def describe(self) -> str:
        """``FGSM eps=16``, ``PGD eps=8, 10 steps of 2``: for tables and figures."""
        c = self.resolved()
        text = f"{c.name.upper().replace('IFGSM', 'I-FGSM')} eps={c.eps:g}"
        if c.name != "fgsm":
            text += f", {c.steps} step{'s' if c.steps != 1 else ''} of {c.step_size:g}"
        if c.targeted:
            text += " targeted"
        return text

    def as_dict(self) -> dict:
        c = self.resolved()
        return {
            "attack": c.name,
            "eps": c.eps,
            "steps": c.steps,
            "step_size": c.step_size,
            "random_start": c.random_start,
            "targeted": c.targeted,
            "eot": c.eot,
        }


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: what a PNG stores, so in-memory and on-disk results agree."""
    return images.clamp(0, 1).mul(255).round().div(255)


def through_purifier(
    purifier: Purifier, images: torch.Tensor, seeds: Sequence[int], backward: str | None = None
) -> torch.Tensor:
    """``purifier(images)`` with a gradient: the true one (``exact``) or BPDA's identity.

    ``backward`` None picks ``exact`` where the purifier is differentiable, else ``bpda``.
    """
    backward = backward or ("exact" if purifier.differentiable else "bpda")
    if backward == "exact":
        return purifier(images, seeds)
    with torch.no_grad():
        purified = purifier(images.detach(), seeds)
    # Forward: the purified image. Backward: d purified / d images = identity.
    return images + (purified - images).detach()


def eot_seeds(seeds: Sequence[int], step: int, draw: int) -> list[int]:
    """The attacker's own randomness per step and draw, never the defence's test-time seeds."""
    return [image_seed(int(seed), f"attack-eot/{step}/{draw}") for seed in seeds]


BACKWARDS = ("exact", "bpda")


class DefendedClassifier(nn.Module):
    """``classifier(purifier(x))`` as one ``nn.Module`` any torch attack code can attack.

    ``forward``: ``[0, 1]`` images ``N x 3 x H x W`` in, logits out. Its gradient is the true
    one through the purifier (``backward="exact"``, the default where the purifier is
    differentiable) or BPDA's identity (``"bpda"``, the default otherwise): the purifier runs in
    the forward pass and is skipped in the backward pass (Athalye et al. 2018).

    A stochastic purifier needs ``seeds``, one per image of the batches this module will see:
    they are the attacker's seeds. Every ``forward`` call draws ``eot`` fresh purifications per
    image (seeds derived from ``seeds``, the call's index and the draw; never the seeds
    themselves, which stay the defence's) and returns the mean of their logits (EOT). A
    deterministic purifier is run once per call; ``seeds`` and ``eot`` are then unused.
    """

    def __init__(
        self,
        purifier: Purifier,
        classifier: nn.Module,
        *,
        backward: str | None = None,
        eot: int = 1,
        seeds: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if backward is not None and backward not in BACKWARDS:
            raise ValueError(f"backward={backward!r}: must be one of {', '.join(BACKWARDS)}")
        if backward == "exact" and not purifier.differentiable:
            raise ValueError(
                f"backward='exact': purifier {purifier.name} is not differentiable; use 'bpda'"
            )
        if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
            raise ValueError(f"eot={eot!r}: must be an integer >= 1")
        if purifier.stochastic and seeds is None:
            raise ValueError(
                f"purifier {purifier.name} is stochastic: pass the attacker's seeds, one per image"
            )
        self.purifier = purifier
        self.classifier = classifier
        self.backward = backward or ("exact" if purifier.differentiable else "bpda")
        self.draws = eot if purifier.stochastic else 1
        # A deterministic purifier ignores seeds, so they are not checked against batches.
        self.seeds = None
        if purifier.stochastic:
            assert seeds is not None
            self.seeds = check_seeds(seeds, len(seeds))  # type: ignore[arg-type]
        self.calls = 0
        self.eval()  # the classifier too: BatchNorm statistics and dropout stay fixed

    def draw_logits(self, images: torch.Tensor, call: int, draw: int) -> torch.Tensor:
        """The logits of one EOT draw of call ``call`` (what :func:`attack` averages)."""
        if self.seeds is None:
            seeds = [0] * images.shape[0]  # a deterministic purifier ignores them
        else:
            if len(self.seeds) != images.shape[0]:
                raise ValueError(f"{len(self.seeds)} seeds for a batch of {images.shape[0]} images")
            seeds = eot_seeds(self.seeds, call, draw)
        return self.classifier(through_purifier(self.purifier, images, seeds, self.backward))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        logits = [self.draw_logits(images, call, draw) for draw in range(self.draws)]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)

    def train(self, mode: bool = True) -> DefendedClassifier:
        # Inference mode always: an attack must not change BatchNorm statistics or dropout.
        return super().train(False)


def check_labels(labels: torch.Tensor, classes: int) -> None:
    """Integer class indices of the model's ``classes`` outputs (cross-entropy would ignore
    -100, and name no argument for others)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise AttackError(f"labels: expected integer class indices, got {labels.dtype}")
    if labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise AttackError(f"labels: {bad} is not a class of a model with {classes} outputs")


def loss_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    purifier: Purifier | None = None,
    seeds: Sequence[int] | None = None,
    eot: int = 1,
    step: int = 0,
) -> torch.Tensor:
    """Gradient of the attacker's objective (to ascend) w.r.t. ``images``, averaged over EOT.

    Untargeted: cross-entropy of the true label; targeted: minus cross-entropy of the target.
    ``model`` may be a :class:`DefendedClassifier`, or a classifier with ``purifier`` given
    (wrapped here); with EOT the gradients of the draws' losses are averaged (step ``step``).
    """
    if purifier is not None:
        model = DefendedClassifier(purifier, model, eot=eot, seeds=seeds)
    draws = model.draws if isinstance(model, DefendedClassifier) else 1
    total: torch.Tensor | None = None
    for draw in range(draws):
        x = images.detach().clone().requires_grad_(True)
        if isinstance(model, DefendedClassifier):
            logits = model.draw_logits(x, step, draw)
        else:
            logits = model(x)
        check_labels(labels, logits.shape[-1])
        loss = F.cross_entropy(logits, labels, reduction="sum")
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, x)
        # Not in place: autograd may hand back a broadcast view (stride 0).
        total = grad if total is None else total + grad
    assert total is not None
    return total if draws == 1 else total / draws


def attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AttackConfig,
    *,
    purifier: Purifier | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Adversarial versions of ``images`` (same device), quantized to 8-bit levels.

    ``labels``: true classes (untargeted) or target classes (``config.targeted``). ``model`` maps
    ``[0, 1]`` images to logits and must live on the images' device; it may be a
    :class:`DefendedClassifier`. ``purifier``: attack ``model(purifier(x))`` through a
    :class:`DefendedClassifier` (true gradient or BPDA, ``config.eot`` draws). ``seeds``: one per
    image, required for a random start and a stochastic purifier (the attacker's randomness).
    """
    c = config.resolved()
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        raise AttackError("labels: expected a 1-D tensor of class indices, one per image")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise AttackError(f"labels: expected integer class indices, got {labels.dtype}")
    labels = labels.to(images.device, torch.long)
    if labels.shape[0] != images.shape[0]:
        raise ValueError("one label per image")
    if seeds is None:
        if c.random_start or (purifier is not None and purifier.stochastic):
            raise AttackError(
                f"{c.describe()}: pass one seed per image (random start, stochastic purifier)"
            )
    else:
        seeds = check_seeds(seeds, images.shape[0])
    if purifier is not None:
        model = DefendedClassifier(purifier, model, eot=c.eot, seeds=seeds)
    eps, alpha = c.eps / 255.0, c.step_size / 255.0
    clean = images.detach()
    x = clean.clone()
    if c.random_start:
        assert seeds is not None
        noise = torch.stack(
            [
                torch.rand(clean.shape[1:], generator=gen) * 2 - 1
                for gen in generators(
                    [image_seed(int(s), "attack-start") for s in seeds], torch.device("cpu")
                )
            ]
        ).to(clean.device)
        x = (clean + eps * noise).clamp(0, 1)
    low, high = clean - eps, clean + eps
    with _eval_mode(model):
        for step in range(c.steps):
            grad = loss_gradient(model, x, labels, targeted=c.targeted, step=step)
            x = torch.sign(grad).mul_(alpha).add_(x.detach()).clamp_(low, high).clamp_(0, 1)
    return quantize(x).detach()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (fixed BatchNorm statistics, no dropout), then as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def attack_in_batches(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AttackConfig,
    *,
    batch_size: int = 16,
    purifier: Purifier | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    progress=None,
) -> torch.Tensor:
    """:func:`attack` over a large CPU batch in chunks on ``device``; returns CPU tensors.

    ``progress``: optional callable given the number of images finished after each chunk.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttackError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if device is None:
        weight = next(model.parameters(), None)
        device = weight.device if weight is not None else images.device
    device = torch.device(device)
    out = []
    for start in range(0, images.shape[0], batch_size):
        stop = start + batch_size
        adv = attack(
            model,
            images[start:stop].to(device),
            labels[start:stop],
            config,
            purifier=purifier,
            seeds=None if seeds is None else seeds[start:stop],
        )
        out.append(adv.cpu())
        if progress is not None:
            progress(min(stop, images.shape[0]))
    return torch.cat(out) if out else images.clone()
