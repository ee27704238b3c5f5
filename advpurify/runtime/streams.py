"""Ordering an engine's GPU work (ONNX Runtime, TensorRT) with torch's on one device.

An engine runs on a CUDA stream of its own: a real stream handle, never 0. (Handed torch's
default stream, whose ``cuda_stream`` is 0, ONNX Runtime creates a stream of its own that does
not wait for torch's kernels, so it could read an input that PPGN's encoder or the context
encoder is still writing.) Before each call that stream waits for torch's current stream, so
every torch write to the inputs comes first; after it torch's current stream waits for the
engine's, and the tensors the engine used are marked as used there, so torch's caching
allocator does not hand their memory out while the engine still reads or writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StreamOrder:
    """The engine's stream and the two waits around each call (events, no host sync)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    @property
    def handle(self) -> int:
        """The raw ``cudaStream_t`` for the engine (non-zero)."""
        return int(self.stream.cuda_stream)

    def before(self) -> None:
        """The engine's stream waits for everything torch queued so far."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def after(self, tensors: Sequence[torch.Tensor]) -> None:
        """torch waits for the engine; the engine's tensors stay allocated until it is done."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for tensor in tensors:
            tensor.record_stream(self.stream)
