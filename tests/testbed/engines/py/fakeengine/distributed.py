"""Multi-node roles shared by the engines: head waits, workers join and stay."""
import os
import sys

from . import rendezvous
from .common import die, host_addr, log

CONNECT_TIMEOUT = float(os.environ.get("TESTBED_CONNECT_TIMEOUT", "30"))
RENDEZVOUS_TIMEOUT = float(os.environ.get("TESTBED_RENDEZVOUS_TIMEOUT", "120"))


def head(port, workers, what):
    """Listen on the rendezvous port and wait for `workers` workers."""
    group = rendezvous.Membership("0.0.0.0", port).start()
    log(f"INFO {what}: waiting for {workers} worker(s) on {host_addr()}:{port}")
    if not group.wait_for(workers, RENDEZVOUS_TIMEOUT):
        die(f"ERROR {what}: timed out after {RENDEZVOUS_TIMEOUT:.0f}s waiting for workers "
            f"({len(group.members)}/{workers} connected)")
    log(f"INFO {what}: all {workers} worker(s) connected")
    return group


def worker(addr, port, rank, what):
    """Join the head at addr:port, then stay until the head goes away."""
    info = {"host": os.environ.get("TESTBED_HOST_ID", ""), "rank": rank}
    sock = rendezvous.join(addr, port, info, CONNECT_TIMEOUT)
    if sock is None:
        die(f"ERROR {what}: failed to connect to master {addr}:{port} "
            f"after {CONNECT_TIMEOUT:.0f}s")
    log(f"INFO {what}: rank {rank} connected to master {addr}:{port}")
    rendezvous.wait_closed(sock)
    log(f"ERROR {what}: lost connection to master {addr}:{port}")
    sys.exit(1)
