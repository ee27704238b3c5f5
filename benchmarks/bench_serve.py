"""``advpurify serve`` under load on 127.0.0.1 vs the library called in-process, in one run.

A real local Ray Serve runs ``rescale`` + ``efficientnet-lite0``; ``--clients`` threads each
send ``--requests`` requests (``POST /classify`` by default: decode, purify, classify) cycling
through the sample images, and the run stops by itself. The baseline does the same work for
the same images in this process, one image at a time, with the same classifier backend
(decode, purify, classify), timed with 1 thread (as each replica runs) and with all of
torch's threads; the faster is the reference. Baseline and load test alternate ``--rounds``
times; medians.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--requests 50] [--route classify]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from advpurify.export.exporter import fit
from advpurify.images import encode_image, find_images
from advpurify.paths import shared_data_dir
from advpurify.serve import app
from advpurify.serve.config import ServeConfig
from advpurify.serve.protocol import read_image, top5
from advpurify.serve.stage import classifier_for, logits, purifier_for, purify


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_test(url: str, bodies: list[bytes], clients: int, requests: int) -> dict[str, float]:
    """``clients`` threads x ``requests`` each; latency per request, requests/s overall."""

    def client(index: int) -> list[float]:
        latencies = []
        for k in range(requests):
            body = bodies[(index * requests + k) % len(bodies)]
            started = time.perf_counter()
            req = urllib.request.Request(url, data=body, method="POST")
            with urllib.request.urlopen(req, timeout=300) as response:
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = sorted(t for part in pool.map(client, range(clients)) for t in part)
    wall = time.perf_counter() - started
    return {
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def in_process(
    config: ServeConfig, bodies: list[bytes], route: str, count: int, threads: int
) -> float:
    """Images/s of the same work called directly: decode, purify (and classify)."""
    torch.set_num_threads(threads)  # before the ORT session is made: it takes torch's count
    purifier = purifier_for(config.method, config.params, config.device)
    classifier = None
    if route == "classify":
        classifier = classifier_for(config.classifier, config.backend, config.device)
    started = time.perf_counter()
    for k in range(count):
        image = read_image(bodies[k % len(bodies)], config.max_pixels)
        purified = purify(purifier, image[None], [0])[0]
        if classifier is not None:
            top5(logits(classifier, [purified])[0])
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "imagenet-sample")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--route", choices=("classify", "purify"), default="classify")
    parser.add_argument("--backend", default="auto", help="classifier backend (auto: ORT)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--crop", type=int, default=0, help="send centre crops of this side as PNG (equal sizes)"
    )
    args = parser.parse_args()

    bodies = [p.read_bytes() for p in find_images(args.data)]
    if args.crop:  # equal sizes: the purifier can batch them too (attacked images are crops)
        bodies = [encode_image(fit(read_image(b, 10**8), args.crop, args.crop)) for b in bodies]
    config = ServeConfig(
        method="rescale",
        classifier="efficientnet-lite0",
        backend=args.backend,
        device=args.device,
        port=free_port(),
        metrics_port=free_port(),
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        replicas=args.replicas,
    ).checked()
    total = args.clients * args.requests
    # Each replica runs 1 thread (Ray sets OMP_NUM_THREADS to its one CPU); the baseline is
    # timed with 1 thread and with all of torch's, and the faster one is the reference.
    thread_counts = sorted({1, torch.get_num_threads()})
    served: list[dict[str, float]] = []
    direct: dict[int, list[float]] = {t: [] for t in thread_counts}
    with app.running(config) as url:
        route = f"{url}/{args.route}"
        load_test(route, bodies[:4], 2, 2)  # warm-up: first batches, ONNX sessions
        in_process(config, bodies, args.route, 4, thread_counts[-1])
        for _ in range(args.rounds):
            for threads in thread_counts:
                direct[threads].append(
                    in_process(config, bodies, args.route, min(total, 100), threads)
                )
            served.append(load_test(route, bodies, args.clients, args.requests))
        with urllib.request.urlopen(f"{url}/stats", timeout=60) as response:
            stats = response.read().decode()
    figure = {key: statistics.median(r[key] for r in served) for key in served[0]}
    baselines = {t: statistics.median(v) for t, v in direct.items()}
    baseline = max(baselines.values())
    print(
        f"{args.route}: rescale + efficientnet-lite0 (backend {args.backend}, device "
        f"{args.device}), {len(bodies)} images"
        + (f" as {args.crop}x{args.crop} PNG crops" if args.crop else "")
    )
    print(
        f"served: {args.clients} clients x {args.requests} requests, max batch {args.max_batch}, "
        f"wait {args.batch_wait_ms:g} ms, {args.replicas} replica(s)"
    )
    print(
        f"  p50 {figure['p50_ms']:.1f} ms  p95 {figure['p95_ms']:.1f} ms  "
        f"{figure['requests_per_s']:.1f} requests/s"
    )
    for threads, rate in baselines.items():
        print(f"in-process library, one image at a time, {threads} thread(s): {rate:.1f} images/s")
    print(
        f"ratio served / faster in-process throughput: {figure['requests_per_s'] / baseline:.2f}x"
    )
    print(f"batch sizes seen by the deployments: {stats}")


if __name__ == "__main__":
    main()
