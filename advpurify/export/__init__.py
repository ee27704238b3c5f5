"""ONNX export with a parity check, fused purifier + classifier graphs, TensorRT engines.

- ``registry``: the networks known by name; others add theirs with ``register_exportable``.
- ``onnx``: export, ``onnx.checker``, ONNX Runtime vs torch parity.
- ``fused``: purifier then classifier as one graph, and why some purifiers cannot be one.
- ``cache``: exported files keyed by the module's content hash, verified on reuse.
- ``tensorrt``: engines through Polygraphy, cached per GPU, TensorRT version and precision.
- ``exporter``: what ``advpurify export`` runs.
"""

from advpurify.export.registry import exportable_names, get_exportable, register_exportable

__all__ = ["exportable_names", "get_exportable", "register_exportable"]
