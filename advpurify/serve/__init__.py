"""Purification as a deployed preprocessing stage: ``advpurify serve`` on Ray Serve.

- ``config``: what a server runs (method, parameters, classifier, limits, batching, replicas).
- ``stage``: the one place that builds the purifier and classifier a deployment calls.
- ``protocol``: HTTP request checks (size, pixels, decoding, parameters, seeds) and answers.
- ``deployments``: the Ray Serve deployments (purifier ingress, classifier), batched.
- ``app``: start Ray and Serve, run the application, stop them again.

Ray is an optional dependency (``pip install 'advpurify[ray]'``): only ``deployments`` and
``app`` touch it, and only when a server is started.
"""
