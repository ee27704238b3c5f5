"""What one server runs: method, parameters, classifier, limits, batching and scale."""

from __future__ import annotations

import dataclasses
from typing import Any

from advpurify.errors import AdvpurifyError
from advpurify.purifiers import purifier_class
from advpurify.purifiers.base import make_settings

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a 24-bit 4096x4096 BMP fits; larger is refused
DEFAULT_MAX_PIXELS = 4096 * 4096  # one float32 RGB image of this size is 200 MB


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything a server needs; checked once, before Ray starts (:meth:`checked`).

    ``params``: the method's typed settings (``{"factor": 0.25}``), as the library takes them.
    """

    method: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    classifier: str | None = None
    backend: str = "auto"
    weights: str | None = None
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    replicas: int = 1
    cpus_per_replica: float = 1.0  # Ray's scheduling share; less on a Ray shared with other work
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    metrics_port: int | None = 8080

    def checked(self) -> ServeConfig:
        """The same config with parameters parsed and every value checked (one-line errors)."""
        params = make_settings(purifier_class(self.method), dict(self.params)).as_dict()
        if self.max_batch < 1:
            raise AdvpurifyError(f"--max-batch {self.max_batch}: must be at least 1")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise AdvpurifyError(f"--batch-wait-ms {self.batch_wait_ms:g}: must be in 0..10000")
        if not 0 < self.cpus_per_replica <= 64:
            raise AdvpurifyError(f"cpus per replica {self.cpus_per_replica:g}: must be in (0, 64]")
        if self.replicas < 1:
            raise AdvpurifyError(f"--replicas {self.replicas}: must be at least 1")
        for option, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 < port < 65536:
                raise AdvpurifyError(f"{option} {port}: must be in 1..65535")
        if self.max_body_bytes < 1 or self.max_pixels < 1:
            raise AdvpurifyError("--max-body-mb and --max-pixels must be positive")
        return dataclasses.replace(self, params=params)

    @property
    def stochastic(self) -> bool:
        return purifier_class(self.method).stochastic
