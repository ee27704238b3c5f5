"""The Ray Serve deployments: the purifier (also the HTTP ingress) and, optionally, the classifier.

A request flows proxy -> purifier replica (size checks, decoding, batched purification) ->
classifier replica (batched classification) for ``/classify``. Both batch concurrent requests
with ``@serve.batch``; the purifier runs each batch as groups of equal image size (and equal
parameters), since one tensor holds one size. The batch sizes each replica ran are counted and
shown by ``GET /stats``.

This module imports Ray at the top: it is imported only when a server starts (``app``).
"""

import asyncio
import json
import logging
import os
import time
from collections import Counter
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from advpurify.errors import AdvpurifyError
from advpurify.images import allow_pixels, encode_image, rgb_profile
from advpurify.models.classifiers import check_resizable
from advpurify.serve.config import ServeConfig
from advpurify.serve.protocol import (
    BodyLimit,
    RequestError,
    check_length,
    flag,
    methods_json,
    query_dict,
    read_image,
    request_params,
    seed_for,
    top5,
)
from advpurify.serve.stage import classifier_for, logits, purifier_for, purify

logger = logging.getLogger("ray.serve")  # a replica's log

api = FastAPI(title="advpurify", description="Purify images, then classify them.")


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # An unknown path or method answers like every other error: {"error", "status"}.
    return _error(
        RequestError(error.status_code, f"{request.method} {request.url.path}: {error.detail}")
    )


MAX_CACHED_PURIFIERS = 8  # per-request parameter sets kept built


class BatchStats:
    """How many requests arrived and the sizes of the batches actually run."""

    def __init__(self) -> None:
        self.requests = 0
        self.batch_sizes: Counter[int] = Counter()

    def record(self, size: int) -> None:
        self.batch_sizes[size] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size": max(self.batch_sizes, default=0),
        }


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica (tests calling methods directly)
        return f"pid-{os.getpid()}"


def _error(error: RequestError) -> JSONResponse:
    return JSONResponse({"error": error.reason, "status": error.status}, status_code=error.status)


@serve.deployment
class ClassifierDeployment:
    """The classifier on its backend; batches concurrent calls into one forward pass."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.classifier = classifier_for(
            config.classifier, config.backend, config.device, config.weights
        )
        self.stats = BatchStats()
        self._classify.set_max_batch_size(config.max_batch)
        self._classify.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    async def classify(self, image: torch.Tensor) -> list[dict[str, Any]] | dict[str, Any]:
        """One ``3 x H x W`` image -> its top-5; an image the preprocessing cannot take -> an
        error answer for this request alone (checked before it joins a batch)."""
        self.stats.requests += 1
        p = self.classifier.module.preprocessing
        try:
            check_resizable(image.shape[-2], image.shape[-1], p.resize_size, p.crop_size)
        except AdvpurifyError as error:
            return {"error": str(error), "status": 413}
        return top5(await self._classify(image))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        self.stats.record(len(images))
        return list(await asyncio.to_thread(logits, self.classifier, images))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.classifier.name,
            "backend": self.classifier.backend,
            "device": str(self.classifier.device),
        }

    def batch_stats(self) -> dict[str, Any]:
        return {"replica": _replica_id(), **self.stats.to_json()}


@serve.deployment
@serve.ingress(api)
class PurifierDeployment:
    """The HTTP front and the purifier: checks, decodes, purifies in batches, encodes."""

    def __init__(self, config: ServeConfig, classifier: Any = None) -> None:
        self.config = config
        allow_pixels(config.max_pixels)  # --max-pixels, not Pillow's own limit, decides
        self.classifier = classifier  # a DeploymentHandle, or None
        self.purifiers: dict[tuple, Any] = {}
        self.default = self._purifier(dict(config.params))
        self.stats = BatchStats()
        self._purify_batch.set_max_batch_size(config.max_batch)
        self._purify_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    def _purifier(self, params: dict[str, Any]):
        key = tuple(sorted(params.items()))
        if key not in self.purifiers:
            if len(self.purifiers) >= MAX_CACHED_PURIFIERS:
                self.purifiers.pop(next(iter(self.purifiers)))
            try:
                self.purifiers[key] = purifier_for(self.config.method, params, self.config.device)
            except AdvpurifyError as error:  # e.g. an even median kernel
                raise RequestError(400, str(error)) from None
        return self.purifiers[key]

    async def _read(self, request: Request) -> tuple[bytes, torch.Tensor, Any, int]:
        """Body (size-limited), image, purifier and seed of a request; 4xx on anything bad."""
        query = query_dict(request.query_params.multi_items())
        check_length(request.headers.get("content-length"), self.config.max_body_bytes)
        params = request_params(self.config.method, self.config.params, query)
        purifier = self._purifier(params)
        body = BodyLimit(self.config.max_body_bytes)
        async for chunk in request.stream():
            body.add(chunk)
        data = body.body()
        seed = seed_for(data, query)
        image = await asyncio.to_thread(read_image, data, self.config.max_pixels)
        return data, image, purifier, seed

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _purify_batch(self, items: list[tuple[Any, torch.Tensor, int]]) -> list:
        # One tensor per image size and parameter set; each image keeps its own seed, so its
        # output does not depend on its batch-mates.
        groups: dict[tuple, list[int]] = {}
        for index, (purifier, image, _seed) in enumerate(items):
            groups.setdefault((id(purifier), tuple(image.shape)), []).append(index)
        results: list[Any] = [None] * len(items)
        for indices in groups.values():
            purifier = items[indices[0]][0]
            images = torch.stack([items[i][1] for i in indices])
            seeds = [items[i][2] for i in indices]
            self.stats.record(len(indices))
            try:
                out = await asyncio.to_thread(purify, purifier, images, seeds)
            except AdvpurifyError as error:
                for i in indices:
                    results[i] = RequestError(422, str(error))
                continue
            except Exception:  # noqa: BLE001 - a bug fails these requests, never their batch-mates
                logger.exception("purifying %d image(s) of %s failed", len(indices), images.shape)
                for i in indices:
                    results[i] = RequestError(500, "internal error while purifying this image")
                continue
            for i, image in zip(indices, out, strict=True):
                results[i] = image
        return results

    async def _purified(self, request: Request):
        data, image, purifier, seed = await self._read(request)
        self.stats.requests += 1
        started = time.perf_counter()
        result = await self._purify_batch((purifier, image, seed))
        if isinstance(result, RequestError):
            raise result
        return data, image, result, purifier, seed, time.perf_counter() - started

    def _headers(self, purifier: Any, seed: int, seconds: float) -> dict[str, str]:
        headers = {
            "X-Advpurify-Method": purifier.name,
            "X-Advpurify-Parameters": json.dumps(purifier.settings.as_dict(), sort_keys=True),
            "X-Advpurify-Seconds": f"{seconds:.6f}",
        }
        if purifier.stochastic:
            headers["X-Advpurify-Seed"] = str(seed)
        return headers

    @api.post("/purify")
    async def purify_route(self, request: Request) -> Response:
        """An image in the body -> the purified image as PNG."""
        try:
            data, _, purified, purifier, seed, seconds = await self._purified(request)
        except RequestError as error:
            return _error(error)
        # The input's colour profile, if any, goes with the values (as purify-batch does).
        png = await asyncio.to_thread(encode_image, purified, "png", 95, rgb_profile(data))
        return Response(png, media_type="image/png", headers=self._headers(purifier, seed, seconds))

    @api.post("/classify")
    async def classify_route(self, request: Request) -> Response:
        """An image in the body -> top-5 of the purified image (``?compare=1``: and the raw)."""
        try:
            if self.classifier is None:
                raise RequestError(404, "no classifier: start the server with --classifier NAME")
            compare = flag(query_dict(request.query_params.multi_items()), "compare")
            _, image, purified, purifier, seed, seconds = await self._purified(request)
        except RequestError as error:
            return _error(error)
        calls = [self.classifier.classify.remote(purified)]
        if compare:
            calls.append(self.classifier.classify.remote(image))
        answers = await asyncio.gather(*calls)
        for answer in answers:
            if isinstance(answer, dict) and "error" in answer:
                return _error(RequestError(answer["status"], answer["error"]))
        body: dict[str, Any] = {
            "method": purifier.name,
            "parameters": purifier.settings.as_dict(),
            "purified": answers[0],
        }
        if purifier.stochastic:
            body["seed"] = seed
        if compare:
            body["unpurified"] = answers[1]
        return JSONResponse(body, headers=self._headers(purifier, seed, seconds))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ok",
            "method": self.config.method,
            "parameters": self.default.settings.as_dict(),
            "device": str(self.default.device),
        }
        if self.classifier is not None:
            body["classifier"] = await self.classifier.describe.remote()
        return body

    @api.get("/methods")
    async def methods(self) -> list[dict[str, Any]]:
        return methods_json()

    @api.get("/stats")
    async def stats_route(self) -> dict[str, Any]:
        """Batch sizes run by this purifier replica (and one classifier replica)."""
        body: dict[str, Any] = {"purifier": {"replica": _replica_id(), **self.stats.to_json()}}
        if self.classifier is not None:
            body["classifier"] = await self.classifier.batch_stats.remote()
        return body
