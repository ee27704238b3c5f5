"""The export application: ONNX files and TensorRT engines of the registered networks, fused
purifier + classifier graphs, and the ``bench`` command.

- ``fused``: purifier then classifier as one graph, and why some purifiers cannot be one.
- ``exporter``: what ``advpurify export`` runs.
- ``bench``: what ``advpurify bench`` runs.
"""
