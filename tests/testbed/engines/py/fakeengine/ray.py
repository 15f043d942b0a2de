"""Fake `ray` CLI: start --head / start --address / status / stop.

The head is a Membership server on its GCS port; workers join it and stay
connected. The cluster address is kept in /tmp/ray/ray_current_cluster
(the host's private /tmp), like Ray does.
"""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import distributed, rendezvous
from .common import default_route_ip, die, host_addr, local_devices, log, loose_args, start_faults

RAY_DIR = Path("/tmp/ray")
CURRENT = RAY_DIR / "ray_current_cluster"
VALUES = {"port", "address", "node-ip-address", "dashboard-port", "dashboard-host",
          "num-gpus", "num-cpus"}
BOOLS = {"head", "block", "disable-usage-stats", "include-dashboard"}


def cluster_address(explicit=None):
    address = explicit or os.environ.get("RAY_ADDRESS")
    if not address and CURRENT.exists():
        address = CURRENT.read_text().strip()
    return address


def cluster_nodes(address=None):
    """Number of nodes in the Ray cluster (head included), or None."""
    address = cluster_address(address)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    members = rendezvous.status(host, int(port))
    return None if members is None else 1 + len(members)


def remember(address):
    (RAY_DIR / "pids").mkdir(parents=True, exist_ok=True)
    CURRENT.write_text(address + "\n")
    (RAY_DIR / "pids" / str(os.getpid())).touch()


def background(block):
    """Without --block, return control to the caller like `ray start` does."""
    if block:
        return
    if os.fork() > 0:
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(fd, std)


def start(opts):
    start_faults("RuntimeError: Failed to start the raylet (fake fault)")
    node_ip = opts.get("node-ip-address") or host_addr()
    if opts.get("head"):
        port = int(opts.get("port") or 6379)
        group = rendezvous.Membership(node_ip, port)
        log(f"Local node IP: {node_ip}\n--------------------\nRay runtime started.\n"
            f"--------------------\nTo add another node to this Ray cluster, run\n"
            f"  ray start --address='{node_ip}:{port}'")
        background(opts.get("block"))
        group.start()
        remember(f"{node_ip}:{port}")
    else:
        address = opts.get("address")
        if not address:
            die("ray start: either --head or --address is required")
        host, _, port = address.rpartition(":")
        # What a node's raylet brings to the cluster: its environment, its default route, devices.
        link = rendezvous.join(host, int(port), {"host": os.environ.get("TESTBED_HOST_ID", ""),
                                                 "node_ip": node_ip, "env": dict(os.environ),
                                                 "default_ip": default_route_ip(),
                                                 "devices": local_devices()},
                               distributed.CONNECT_TIMEOUT)
        if link is None:
            die(f"ConnectionError: Unable to connect to GCS at {address}. Check that the "
                "head node is reachable.")
        log(f"Local node IP: {node_ip}\n--------------------\nRay runtime started.")
        background(opts.get("block"))
        remember(address)
        for message in link.messages():
            if "actor_env" in message:  # the environment vLLM's worker process runs with here
                (RAY_DIR / "actor_env.json").write_text(json.dumps(message["actor_env"]))
        die("The node with node id was marked dead: lost connection to the head (GCS).")
    threading.Event().wait()


def status(opts):
    address = cluster_address(opts.get("address"))
    nodes = cluster_nodes(address) if address else None
    if nodes is None:
        die("ConnectionError: Could not find any running Ray instance. Please specify the one "
            "to connect to by setting `--address` flag or `RAY_ADDRESS` environment variable.")
    print(f"======== Autoscaler status: {time.strftime('%Y-%m-%d %H:%M:%S')} ========\n"
          "Node status\n" + "-" * 63 + "\nActive:\n" +
          "".join(f" 1 node_{i:040x}\n" for i in range(nodes)) +
          "Pending:\n (no pending nodes)\nRecent failures:\n (no failures)\n\n"
          "Resources\n" + "-" * 63 + f"\nUsage:\n 0.0/{20.0 * nodes} CPU\n"
          f" 0.0/{float(nodes)} GPU\n")
    return 0


def stop():
    pids = [int(p.name) for p in (RAY_DIR / "pids").glob("*")] if RAY_DIR.exists() else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        (RAY_DIR / "pids" / str(pid)).unlink(missing_ok=True)
    CURRENT.unlink(missing_ok=True)
    log(f"Stopped all {len(pids)} Ray processes.")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    opts, _ = loose_args(rest, VALUES, BOOLS)
    if command == "start":
        return start(opts)
    if command == "status":
        return status(opts)
    if command == "stop":
        return stop()
    die(f"Usage: ray [OPTIONS] COMMAND [ARGS]...\nError: No such command '{command}'.", 2)
