#!/usr/bin/env python3
"""One `status` refresh (what `status --watch` does each time) of 3 simulated hosts running 2
workloads (vLLM on hosts 1+2, llama.cpp on host 3): wall time, the CPU it costs this machine,
the CPU and time the probe costs a host (measured on the host), and SSH connections.

On the bed, a host's docker and nvidia-smi are Python stand-ins: the host CPU figure includes
their interpreter starts, which the real tools do not have.

Usage: SPARKRUN_TEST_BED_OCTET=N python3 benchmarks/status_refresh.py [--runs N]
"""

import os
import resource
import statistics
import sys
import time

from common import REPO, bed, runs_parser, sparkrun

sys.path.insert(0, str(REPO))
import sparkrun as sr  # noqa: E402

IMAGES = ("scitrera/dgx-spark-vllm:0.16.0-t5", "scitrera/dgx-spark-llama-cpp:b8094-cu131")


def cpu_seconds() -> float:
    """This process's CPU time, with its reaped children (the ssh clients)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def probe_on_host(monitor: sr.StatusMonitor, host: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one probe on the host: $EPOCHREALTIME around it, and bash's `times`
    (the shell, then its children) once every child is reaped."""
    script = ("probe_start=$EPOCHREALTIME\n" + sr.probe_script(metric_names=monitor.metric_names)
              + "wait\necho \"$probe_start $EPOCHREALTIME\"\ntimes\n")
    *_, clocks, shell, children = monitor.ssh.run(host, script).stdout.strip().splitlines()
    start, end = (float(c.replace(",", ".")) for c in clocks.split())
    cpu = 0.0
    for field in f"{shell} {children}".split():
        minutes, _, seconds = field.rstrip("s").partition("m")
        cpu += int(minutes) * 60 + float(seconds)
    return end - start, cpu


def main() -> None:
    args = runs_parser(__doc__, 30).parse_args()
    octet = int(os.environ.get("SPARKRUN_TEST_BED_OCTET", "101"))
    with bed(3, first_octet=octet) as (testbed, env, _):
        for image in IMAGES:
            testbed.add_image(image)
        hosts = [h.addr for h in testbed.hosts]
        sparkrun(env, "run", "qwen3-1.7b-vllm", "-H", f"{hosts[0]},{hosts[1]}", "--tp", 2, "--no-sync", "--no-follow")
        sparkrun(env, "run", "qwen3-1.7b-llama-cpp", "-H", hosts[2], "--no-sync", "--no-follow")
        os.environ.update(env)
        monitor = sr.StatusMonitor(sr.SSH(None, 0), hosts, True, sr.STALL_AFTER_S)
        _, workloads = monitor.refresh()  # the first one opens the ssh master connections
        assert [w["health"] for w in workloads] == ["ready", "ready"], workloads
        for host in testbed.hosts:
            host.reset_connections()
        walls, cpus = [], []
        for _ in range(args.runs):
            cpu, start = cpu_seconds(), time.perf_counter()
            monitor.refresh()
            walls.append(time.perf_counter() - start)
            cpus.append(cpu_seconds() - cpu)
        connections = [h.connection_count() for h in testbed.hosts]
        on_host = [probe_on_host(monitor, hosts[0]) for _ in range(max(3, args.runs // 3))]
        host_wall, host_cpu = (statistics.median(values) for values in zip(*on_host))
        command, _ = sparkrun(env, "status", "-H", ",".join(hosts), "--json")
        print(f"one refresh, 3 hosts, 2 workloads: wall {statistics.median(walls) * 1000:.0f} ms median, "
              f"{max(walls) * 1000:.0f} ms worst of {args.runs} (target <= 150 ms)")
        print(f"CPU on this machine per refresh: {statistics.median(cpus) * 1000:.0f} ms median "
              f"(sparkrun and its ssh clients)")
        print(f"on a host per refresh (host 1: vLLM head; the probe script and the tools it starts): "
              f"CPU {host_cpu * 1000:.0f} ms, wall {host_wall * 1000:.0f} ms (medians)")
        print(f"new SSH connections per host over the {args.runs} refreshes: {connections}")
        print(f"`sparkrun status --json` as a command (Python start-up included): {command * 1000:.0f} ms")


if __name__ == "__main__":
    main()
