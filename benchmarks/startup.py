#!/usr/bin/env python3
"""Median wall time of sparkrun's quick commands (`--help`, `list`, `show`), warm caches.

Usage: python3 benchmarks/startup.py [--runs N] [--python PATH]
Prints one line per command. Also prints the interpreter's own start-up time for reference.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_ms(argv: list[str], env: dict, runs: int) -> float:
    subprocess.run(argv, env=env, capture_output=True, check=True)  # warm caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, HOME=home, HF_HUB_OFFLINE="1", SPARKRUN_CONFIG_DIR=f"{home}/config",
                   SPARKRUN_CACHE_DIR=f"{home}/cache", SPARKRUN_DEFAULT_REGISTRIES="")
        script = [args.python, str(REPO / "sparkrun.py")]
        print(f"python {args.python}, {args.runs} runs each, median:")
        print(f"  {'python -c pass':40s} {median_ms([args.python, '-c', 'pass'], env, args.runs):6.1f} ms")
        for extra in (["--help"], ["list"], ["show", "nemotron3-nano-30b-nvfp4-vllm"]):
            label = "sparkrun " + " ".join(extra)
            print(f"  {label:40s} {median_ms(script + extra, env, args.runs):6.1f} ms")


if __name__ == "__main__":
    main()
