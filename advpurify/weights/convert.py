"""Turning a weight file of any accepted format into a checked state dict for one module.

A converter states the exact parameter names and shapes it expects (read off the module built
on the ``meta`` device, so nothing is allocated) and gets back a complete state dict, or an
error listing every missing name and every shape mismatch: weights are never loaded half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from advpurify.weights.caffe import fit_blob, read_caffemodel
from advpurify.weights.registry import WeightsError
from advpurify.weights.state_dicts import read_safetensors, read_state_dict

Shapes = dict[str, tuple[int, ...]]


def parameter_shapes(build: Callable[[], nn.Module]) -> Shapes:
    """``name -> shape`` of every parameter (not buffers) of the module ``build()`` returns."""
    with torch.device("meta"):
        module = build()
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def read_any(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Raw tensors from a .caffemodel / .pt / .pth / .safetensors, and the legacy-shaped keys.

    Caffe blobs come out as ``<layer>.weight`` / ``<layer>.bias`` (blob 0 / blob 1).
    """
    suffix = path.suffix.lower()
    legacy: set[str] = set()
    if suffix == ".caffemodel":
        state = {}
        for layer in read_caffemodel(path).layers:
            for index, blob in enumerate(layer.blobs[:2]):
                key = f"{layer.name}.{('weight', 'bias')[index]}"
                state[key] = torch.from_numpy(blob.data.copy())
                if blob.legacy:
                    legacy.add(key)
        return state, legacy
    if suffix in (".pt", ".pth"):
        return read_state_dict(path), legacy
    if suffix == ".safetensors":
        state = read_safetensors(path)
        # Files from `weights convert` use <layer>.<blob index>.
        renamed = {}
        for key, tensor in state.items():
            layer, _, index = key.rpartition(".")
            if index in ("0", "1"):
                key = f"{layer}.{('weight', 'bias')[int(index)]}"
                legacy.add(key)
            renamed[key] = tensor
        return renamed, legacy
    raise WeightsError(f"{path}: unsupported weight file type {path.suffix!r}")


def checked_state(
    path: Path,
    expected: Shapes,
    aliases: Mapping[str, str] | None = None,
    prefixes: tuple[str, ...] = ("module.", "G.", "model.", "net."),
) -> dict[str, torch.Tensor]:
    """The file's tensors renamed to ``expected``'s names, every one present and well shaped.

    ``aliases`` maps other layer names (a port's naming) to ours; ``prefixes`` are stripped.
    Tensors the module does not use (a classifier's fc7/fc8) are ignored. A file whose names
    match none of ours (an ``nn.Sequential`` port keyed ``0.weight``, ``4.weight`` ...) is
    matched by order instead, but only if its leading tensors have exactly our shapes in our
    order.
    """
    raw, legacy = read_any(Path(path))
    aliases = aliases or {}
    state: dict[str, torch.Tensor] = {}
    legacy_keys = set()
    for key, tensor in raw.items():
        name = key
        for prefix in prefixes:
            if name.startswith(prefix) and name[len(prefix) :] not in raw:
                name = name[len(prefix) :]
        layer, _, leaf = name.rpartition(".")
        name = f"{aliases.get(layer, layer)}.{leaf}"
        if name in expected:
            state[name] = tensor.to(torch.float32)
            if key in legacy:
                legacy_keys.add(name)
    problems = []
    for name, shape in expected.items():
        if name in state:
            try:
                state[name] = fit_blob(name, state[name], shape, legacy=name in legacy_keys)
            except WeightsError:
                problems.append(f"{name} shape {tuple(state[name].shape)}, expected {shape}")
    if not state and not problems:
        state, reason = _by_order(raw, expected)
        if reason:
            raise WeightsError(
                f"{path}: refused, no tensor named like ours ({next(iter(expected))}, ...) and "
                f"not the same layers in order: {reason}"
            )
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        problems.append(f"{', '.join(missing[:4])}{more} missing")
    if problems:
        raise WeightsError(f"{path}: refused, layers do not match: {'; '.join(problems)}")
    return {name: state[name].contiguous() for name in expected}


def _by_order(
    raw: Mapping[str, torch.Tensor], expected: Shapes
) -> tuple[dict[str, torch.Tensor], str]:
    """The file's first tensors, in file order, if their shapes are ``expected``'s in order;
    otherwise an empty dict and the first difference."""
    tensors = list(raw.items())[: len(expected)]
    if len(tensors) < len(expected):
        return {}, f"{len(raw)} tensors, expected at least {len(expected)}"
    for (key, tensor), (name, shape) in zip(tensors, expected.items(), strict=True):
        if tuple(tensor.shape) != shape:
            return {}, f"{key} has shape {tuple(tensor.shape)}, expected {shape} ({name})"
    return {name: t.to(torch.float32) for name, (_, t) in zip(expected, tensors, strict=True)}, ""
