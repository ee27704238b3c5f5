"""Run every benchmark script in this folder, one after another (``make bench``).

Each script prints ratios measured within its own run; pass ``--only NAME`` to run one.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts that compare against packages advpurify does not depend on: run where installed.
NEEDS = {"bench_peers": (("art", "torchattacks"), "pip install 'advpurify[peers]'")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="e.g. pipeline, dip")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    failed = 0
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        modules, install = NEEDS.get(script.stem, ((), ""))
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            print(f"skipped: needs {', '.join(missing)} ({install})", flush=True)
            continue
        failed += subprocess.call([sys.executable, str(script)]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
