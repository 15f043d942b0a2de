#!/usr/bin/env python3
"""`sparkrun stop` on 1 and 3 simulated hosts: the graceful stop (docker stop -t 15, then rm -f)
against an engine that exits promptly on SIGTERM, the same with --force, and once against an
engine that takes longer than the grace to shut down; then how long after a host's available
memory falls under the floor a launch still starting is stopped (the memory guard).

The stand-in engines exit on SIGTERM within milliseconds; a real vLLM takes seconds (its engine
core up to 5 s, its workers 4 s more), which the graceful stop waits for, up to 15 s.

Usage: SPARKRUN_TEST_BED_OCTET=N python3 benchmarks/stop_and_guard.py [--runs N]
"""

import statistics
import subprocess
import time

from common import PYTHON, bed, runs_parser, sparkrun

IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
RECIPE = "qwen3-1.7b-vllm"


def left_in_dev_shm(hosts) -> int:
    return sum(len(list(h.dev_shm.iterdir())) for h in hosts if h.dev_shm.is_dir())


def stop_times(env: dict, hosts: list, runs: int, *stop_args) -> list[float]:
    """Wall seconds of `stop` after each of `runs` launches on `hosts`."""
    addresses = ",".join(h.addr for h in hosts)
    times = []
    for _ in range(runs):
        sparkrun(env, "run", RECIPE, "-H", addresses, "--tp", len(hosts), "--no-sync", "--no-follow")
        times.append(sparkrun(env, "stop", RECIPE, "-H", addresses, *stop_args)[0])
    return times


def guard_seconds(env: dict, testbed) -> float:
    """Seconds from a worker's meminfo falling to 1.9 GB to the failed launch's exit."""
    head, worker = testbed.hosts[:2]
    worker.fault("engine_slow_ready", "300")
    launch = subprocess.Popen([PYTHON, "-c", "import sys, sparkrun; sys.exit(sparkrun.main())", "run", RECIPE,
                               "-H", f"{head.addr},{worker.addr}", "--tp", "2", "--no-sync", "--no-follow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in launch.stderr:  # bounded by the launch itself: it ends within the ready timeout
            if "not ready yet" in line:
                break
        (worker.root / "meminfo").write_text("MemTotal:       127600748 kB\nMemAvailable:    2000000 kB\n")
        fell = time.monotonic()
        launch.wait(timeout=120)
        return time.monotonic() - fell
    finally:
        launch.kill()
        worker.fault("engine_slow_ready", False)


def main() -> None:
    args = runs_parser(__doc__, 5).parse_args()
    with bed(3, first_octet=91) as (testbed, env, _):
        testbed.add_image(IMAGE)
        for nodes in (1, 3):
            hosts = testbed.hosts[:nodes]
            graceful = stop_times(env, hosts, args.runs)
            left = left_in_dev_shm(hosts)
            forced = stop_times(env, hosts, args.runs, "--force")
            print(f"{nodes} host(s): stop {statistics.median(graceful):.2f} s (graceful, {left} segments left in "
                  f"/dev/shm), stop --force {statistics.median(forced):.2f} s ({left_in_dev_shm(hosts) - left} "
                  f"left), median of {args.runs}")
            for host in hosts:
                subprocess.run(["rm", "-rf", str(host.dev_shm)], check=True)
        slow = testbed.hosts[0]
        slow.fault("engine_slow_stop", "60")
        (seconds,) = stop_times(env, [slow], 1)
        slow.fault("engine_slow_stop", False)
        print(f"1 host, an engine that needs 60 s to shut down: stop {seconds:.2f} s "
              f"({left_in_dev_shm([slow])} segment left in /dev/shm after the SIGKILL)")
        print(f"memory guard: a 2-host launch still starting stopped {guard_seconds(env, testbed):.1f} s after "
              "the worker's available memory fell to 1.9 GB (floor 6.1 GB)")


if __name__ == "__main__":
    main()
