#!/usr/bin/env python3
"""`sparkrun status` on 3 simulated hosts: wall time cold and warm, and how many TCP
connections each host's sshd accepted (from its log).

Usage: python3 benchmarks/ssh_fanout.py [--runs N]
"""


from common import bed, median_ms, runs_parser, sparkrun


def main() -> None:
    args = runs_parser(__doc__, 15).parse_args()
    with bed(3, first_octet=71) as (testbed, env, _):
        hosts = ",".join(h.addr for h in testbed.hosts)
        for host in testbed.hosts:
            host.reset_connections()
        cold, _ = sparkrun(env, "status", "-H", hosts, "--no-probe")
        after_cold = [h.connection_count() for h in testbed.hosts]
        warm = [sparkrun(env, "status", "-H", hosts, "--no-probe")[0] for _ in range(args.runs)]
        after_warm = [h.connection_count() for h in testbed.hosts]
        print(f"status on 3 hosts, cold (new connections): {cold * 1000:.0f} ms; "
              f"connections per host: {after_cold}")
        print(f"status on 3 hosts, warm (median of {args.runs}): {median_ms(warm)}; "
              f"connections per host after all {args.runs + 1} commands: {after_warm}")


if __name__ == "__main__":
    main()
