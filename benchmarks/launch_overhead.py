#!/usr/bin/env python3
"""`sparkrun run --no-follow` on 1 and 3 simulated hosts against an instantly-ready stand-in
server: wall time, split into sparkrun's own time and time spent waiting for the server (and,
of sparkrun's own, freeing the page cache), and SSH connections per host.

Usage: python3 benchmarks/launch_overhead.py [--runs N]
"""

import re
import statistics

from common import bed, runs_parser, sparkrun

IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"


def main() -> None:
    args = runs_parser(__doc__, 5).parse_args()
    with bed(3, first_octet=81) as (testbed, env, _):
        testbed.add_image(IMAGE)
        for nodes in (1, 3):
            hosts = ",".join(h.addr for h in testbed.hosts[:nodes])
            walls, waits, page_caches, conns = [], [], [], []
            for _ in range(args.runs):
                testbed.close_client_masters()
                for host in testbed.hosts:
                    host.reset_connections()
                wall, result = sparkrun(env, "run", "qwen3-1.7b-vllm", "-H", hosts, "--tp", nodes,
                                        "--no-sync", "--no-follow", "-v")
                waited = float(re.search(r"([\d.]+) s waiting for the server", result.stderr)[1])
                page_caches.append(float(re.search(r"([\d.]+) s freeing the page cache", result.stderr)[1]))
                walls.append(wall)
                waits.append(waited)
                conns.append([h.connection_count() for h in testbed.hosts[:nodes]])
                sparkrun(env, "stop", "qwen3-1.7b-vllm", "-H", hosts)
            wall, wait = statistics.median(walls), statistics.median(waits)
            print(f"{nodes} host(s): wall {wall:.2f} s = sparkrun's own {wall - wait:.2f} s (freeing the page "
                  f"cache {statistics.median(page_caches):.2f} s) + waiting for the server {wait:.2f} s "
                  f"(median of {args.runs}); SSH connections per host: {conns[0]}")


if __name__ == "__main__":
    main()
