"""purify-batch --engine ray on one machine: time against the local engine, and peak memory.

1. The 100 sample images, the local engine and Ray interleaved in one process (one local Ray,
   started once; its start-up is printed apart): the ratio is what Ray's scheduling, object
   store and actor start cost on one machine, the price of being able to scale out.
2. Peak memory of a Ray run on 1,000 vs 10,000 images (128x96 PNG, rescale): each size in a
   fresh process that starts its own local Ray; the parent samples the proportional set size
   (PSS: shared object-store pages counted once) of that process and every process under it
   (GCS, raylet, workers, actors) every 0.2 s.

    .venv/bin/python benchmarks/bench_ray.py [--rounds 2] [--small 1000] [--large 10000]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import make_small_folder  # noqa: E402

NUM_CPUS = 2


def start_ray() -> float:
    import ray

    from advpurify.pipeline.ray_engine import object_store_bytes

    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        object_store_memory=object_store_bytes(),
        logging_level="WARNING",
    )
    return time.perf_counter() - started


def compare_engines(methods: list[str], rounds: int) -> None:
    import ray

    from advpurify.paths import shared_data_dir
    from advpurify.pipeline.batch import PipelineOptions, execute, plan_run
    from advpurify.pipeline.ray_engine import execute_ray
    from advpurify.purifiers import create_purifier

    source = shared_data_dir() / "imagenet-sample"
    print(f"local Ray start-up ({NUM_CPUS} CPUs): {start_ray():.1f} s (once per run, not below)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for method in methods:
                times: dict[str, list[float]] = {"local": [], "ray": []}
                for k in range(rounds):
                    for engine, run in (("local", execute), ("ray", execute_ray)):
                        out = Path(tmp) / f"{method}-{engine}-{k}"
                        options = PipelineOptions(batch_size=16, workers=2)
                        plan = plan_run(source, out, create_purifier(method), options)
                        started = time.perf_counter()
                        summary = run(plan)
                        times[engine].append(time.perf_counter() - started)
                        assert summary.done == 100, summary
                local, on_ray = (statistics.median(times[e]) for e in ("local", "ray"))
                print(
                    f"{method:8s} 100 images: local {local:5.1f} s ({100 / local:5.1f} img/s), "
                    f"ray {on_ray:5.1f} s ({100 / on_ray:5.1f} img/s), "
                    f"ray/local time {on_ray / local:.2f}"
                )
    finally:
        ray.shutdown()


def child(folder: str, out: str) -> None:
    from advpurify.pipeline.batch import PipelineOptions, plan_run
    from advpurify.pipeline.ray_engine import execute_ray, object_store_bytes
    from advpurify.purifiers import create_purifier

    store_mib = object_store_bytes() / 2**20
    start_ray()
    plan = plan_run(
        folder, out, create_purifier("rescale"), PipelineOptions(batch_size=16, workers=2)
    )
    summary = execute_ray(plan)
    driver_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{summary.done} {summary.seconds:.2f} {driver_mib:.1f} {store_mib:.0f}", flush=True)
    import ray

    ray.shutdown()


def _tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return pids


def _pss_mib(pids: list[int]) -> float:
    total_kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total_kib += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kib / 1024


def measure_memory(small: int, large: int) -> None:
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (small, large):
            folder = Path(tmp) / f"in{count}"
            make_small_folder(folder, count)
            command = [sys.executable, __file__, "--child", str(folder), str(Path(tmp) / "o")]
            command[-1] += str(count)
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            peak = 0.0
            while process.poll() is None:
                peak = max(peak, _pss_mib(_tree(process.pid)))
                time.sleep(0.2)
            if process.returncode != 0:
                raise SystemExit(f"the {count}-image run failed (exit {process.returncode})")
            line = process.stdout.read().strip().splitlines()[-1]
            done, seconds, driver, store = line.split()
            peaks[count] = peak
            print(
                f"ray, {done} images of 128x96: {float(seconds):.1f} s "
                f"({int(done) / float(seconds):.0f} img/s), peak PSS of all Ray processes "
                f"{peak:.0f} MiB, driver peak RSS {float(driver):.0f} MiB, "
                f"object store {store} MiB"
            )
    print(f"peak memory ratio {large} / {small} images: {peaks[large] / peaks[small]:.2f}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rescale,median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    args = parser.parse_args()
    if not args.skip_compare:
        compare_engines(args.methods.split(","), args.rounds)
    if not args.skip_memory:
        measure_memory(args.small, args.large)


if __name__ == "__main__":
    main()
