"""The transforms as they were before issue 15 made them faster, kept verbatim.

``tests/test_transforms.py`` checks that the current implementations give the same bits, and
``benchmarks/bench_peers.py --before-after`` times both in one process.
"""

from __future__ import annotations

import torch


def tv_chambolle_before(images, weight=0.1, eps=2e-4, iterations=200):
    """``advpurify.purifiers.transforms.tv_chambolle`` before it chunked and compacted."""
    x = images
    tau = 0.25
    p = torch.zeros((2, *x.shape), dtype=x.dtype, device=x.device)
    g = torch.zeros_like(p)
    result = x.clone()
    active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    pixels = float(x.shape[-2] * x.shape[-1])
    e_init = e_prev = None
    out = x
    for i in range(iterations):
        if i > 0:
            d = -p.sum(0)
            d[..., 1:, :] += p[0, ..., :-1, :]
            d[..., :, 1:] += p[1, ..., :, :-1]
            out = x + d
            energy = d.square().sum((-2, -1))
        else:
            out = x
            energy = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        g[0, ..., :-1, :] = out[..., 1:, :] - out[..., :-1, :]
        g[1, ..., :, :-1] = out[..., :, 1:] - out[..., :, :-1]
        norm = g.square().sum(0).sqrt()
        energy = (energy + weight * norm.sum((-2, -1))) / pixels
        p = (p - tau * g) / (norm * (tau / weight) + 1.0)
        if i == 0:
            e_init = e_prev = energy
            continue
        converged = active & ((e_prev - energy).abs() < eps * e_init)
        result[converged] = out[converged]
        active &= ~converged
        e_prev = energy
        if not bool(active.any()):
            return result
    result[active] = out[active]
    return result
