"""The DIP fitter as it was before the per-image state object and the flat Adam (issue 15).

Kept verbatim (renamed, its nets set to the convolution kernels of the time) so that
``benchmarks/bench_dip.py`` measures the speed-up against it in one process and
``tests/test_dip.py`` checks that the new fitter gives bit-identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.func import functional_call

from advpurify.models.skipnet import GroupConv, SkipNet
from advpurify.purifiers.base import generators
from advpurify.purifiers.dip import (
    DipResult,
    DipSettings,
    StepHook,
    _deterministic,
    pad_to_multiple,
)


class _Adam:
    """Adam (as ``torch.optim.Adam``) over a dict of stacked weights whose rows can be dropped."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, 0.9, 0.999, 1e-8
        self.step_count = 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.step_count += 1
        bias1 = 1 - self.beta1**self.step_count
        bias2_sqrt = math.sqrt(1 - self.beta2**self.step_count)
        for name, param in params.items():
            grad = grads[name]
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-self.lr / bias1)

    def keep(self, rows: torch.Tensor) -> None:
        self.exp_avg = {k: v[rows] for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[rows] for k, v in self.exp_avg_sq.items()}


def fit_group_reference(
    images: torch.Tensor, seeds: Sequence[int], s: DipSettings, on_step: StepHook | None
) -> DipResult:
    device = images.device
    n = images.shape[0]
    config = s.skip_config()
    # At least 2 x 2 pixels at the coarsest scale: BatchNorm needs more than one value.
    multiple = 2**config.scales
    target, (top, left, height, width) = pad_to_multiple(images, multiple, 2 * multiple)
    H, W = target.shape[-2:]

    def crop(x: torch.Tensor) -> torch.Tensor:
        return x[..., top : top + height, left : left + width]

    with _deterministic(device):
        gens = generators(seeds, device)
        # Per image, in this order from its own generator: weights, then z, then step noise.
        net = SkipNet(config, n_nets=n, seeds=gens, device=device)
        for module in net.modules():  # the convolution kernels of the time (the one change)
            if isinstance(module, GroupConv):
                module.matmul_1x1 = False
        net.set_grouped({"auto": None, "grouped": True, "split": False}[s.conv])
        z = torch.stack(
            [torch.rand(s.input_depth, H, W, generator=g, device=device) for g in gens]
        ).mul_(s.input_scale)
        params = {k: p.detach().clone().requires_grad_() for k, p in net.named_parameters()}
        adam = _Adam(params, s.lr)
        snapshot = {k: p.detach().clone() for k, p in params.items()}
        last_psnr = torch.full((n,), -math.inf, device=device)
        restores = torch.zeros(n, dtype=torch.long, device=device)
        active = list(range(n))
        avg: torch.Tensor | None = None
        result = images.new_empty(images.shape)
        stopped_at = [s.iterations] * n
        restores_out = [0] * n
        window = s.window if s.stop == "variance" else 0
        history = torch.empty((n, window, 3, H, W), device=device) if window else None
        best_var = torch.full((n,), math.inf, device=device)
        best_out = torch.empty((n, 3, H, W), device=device) if window else None
        best_it = torch.zeros(n, dtype=torch.long, device=device)

        for it in range(1, s.iterations + 1):
            net_input = z
            if s.reg_noise_std > 0:
                noise = torch.stack(
                    [torch.randn(z.shape[1:], generator=g, device=device) for g in gens]
                )
                net_input = z + s.reg_noise_std * noise
            out = functional_call(net, params, (net_input,))
            err = (out - target).square().flatten(1).mean(1)
            # Sum, not mean: each image gets exactly the gradient it would get alone.
            grads = torch.autograd.grad(err.sum(), list(params.values()))
            out = out.detach()
            with torch.no_grad():
                psnr = -10.0 * torch.log10(err.detach().clamp_min(1e-12))
                bad = psnr < last_psnr - s.guard_db if s.guard_db > 0 else psnr < -math.inf
                any_bad = bool(bad.any())
                good = ~bad
                for name, param in params.items():  # remember weights that fitted well
                    if any_bad:
                        snapshot[name][good] = param[good]
                    else:
                        snapshot[name].copy_(param)
                adam.step(params, dict(zip(params, grads, strict=True)))
                if any_bad:
                    for name, param in params.items():
                        param[bad] = snapshot[name][bad]
                    restores += bad.long()
                last_psnr = torch.where(good, psnr, last_psnr)
                if avg is None:
                    avg = out.clone()
                elif s.ema > 0:
                    mixed = avg * s.ema + out * (1 - s.ema)
                    avg = torch.where(bad.view(-1, 1, 1, 1), avg, mixed)
                else:
                    avg = torch.where(bad.view(-1, 1, 1, 1), avg, out)
                if on_step is not None:
                    on_step(it, list(active), crop(out), crop(avg))

                done = torch.zeros(len(active), dtype=torch.bool, device=device)
                if history is not None and best_out is not None:
                    history[:, (it - 1) % window] = out
                    if it >= window:
                        var = history.var(dim=1, unbiased=False).flatten(1).mean(1)
                        better = var < best_var
                        best_var = torch.where(better, var, best_var)
                        best_it = torch.where(better, it, best_it)
                        best_out[better] = avg[better]
                        done = it - best_it >= s.patience
                if it == s.iterations:
                    done[:] = True
                if not bool(done.any()):
                    continue
                final = best_out if best_out is not None else avg
                for row in done.nonzero().flatten().tolist():
                    index = active[row]
                    result[index] = crop(final[row])
                    stopped_at[index] = int(best_it[row]) if best_out is not None else it
                    restores_out[index] = int(restores[row])
                if bool(done.all()):
                    break
                # Drop finished images from every per-image state, so they cost nothing more.
                rows = (~done).nonzero().flatten()
                keep = rows.tolist()
                active = [active[r] for r in keep]
                gens = [gens[r] for r in keep]
                params = {k: p[rows].detach().requires_grad_() for k, p in params.items()}
                snapshot = {k: p[rows] for k, p in snapshot.items()}
                adam.keep(rows)
                z, target, avg = z[rows], target[rows], avg[rows]
                last_psnr, restores = last_psnr[rows], restores[rows]
                best_var, best_it = best_var[rows], best_it[rows]
                if history is not None and best_out is not None:
                    history, best_out = history[rows], best_out[rows]
    return DipResult(images=result, iterations=stopped_at, restores=restores_out)
