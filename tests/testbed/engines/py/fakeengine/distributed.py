"""Multi-node roles shared by the engines: head waits, workers join and stay.

The head tells each worker the address it advertises (vLLM's and SGLang's get_ip(), see
common.advertised_ip); a worker then reaches the head there, as the engines' message queues
do (vllm/distributed/device_communicators/shm_broadcast.py). An address the worker cannot
reach (0.0.0.0 in an offline lab) makes the real engine wait forever; here the wait is bounded.
"""
import os
import sys

from . import rendezvous
from .common import die, host_addr, local_devices, log

CONNECT_TIMEOUT = float(os.environ.get("TESTBED_CONNECT_TIMEOUT", "30"))
RENDEZVOUS_TIMEOUT = float(os.environ.get("TESTBED_RENDEZVOUS_TIMEOUT", "120"))


def check_nccl(env, devices, where):
    """Fail as NCCL does when a node's variables name interfaces or RDMA devices it does not have
    (nccl src/bootstrap.cc "no socket interface found", src/net.cc "Failed to initialize any NET
    plugin" when NCCL_NET=IB finds no device of NCCL_IB_HCA)."""
    error = "torch.distributed.DistBackendError: NCCL error: internal error - please report this issue " \
            f"to the NCCL developers ({where})\nLast error:\n"
    wanted = [name for name in (env.get("NCCL_SOCKET_IFNAME") or "").split(",") if name]
    if wanted and not any(name.lstrip("=") in devices["net"] for name in wanted):
        die(error + f"Bootstrap : no socket interface found (NCCL_SOCKET_IFNAME={env['NCCL_SOCKET_IFNAME']})")
    hcas = [name.split(":")[0].lstrip("=^") for name in (env.get("NCCL_IB_HCA") or "").split(",") if name]
    if env.get("NCCL_NET") == "IB" and env.get("NCCL_IB_DISABLE") != "1" and not set(hcas) & set(devices["ib"]):
        die(error + f"NET/IB : No device found (NCCL_IB_HCA={env.get('NCCL_IB_HCA')}). "
                    "Failed to initialize any NET plugin")


def head(port, workers, what, advertise=None):
    """Listen on the rendezvous port and wait for `workers` workers; returns the group."""
    check_nccl(os.environ, local_devices(), f"{what} head")
    group = rendezvous.Membership("0.0.0.0", port, {"advertise": advertise}).start()
    log(f"INFO {what}: waiting for {workers} worker(s) on {host_addr()}:{port}")
    if not group.wait_for(workers, RENDEZVOUS_TIMEOUT):
        die(f"ERROR {what}: timed out after {RENDEZVOUS_TIMEOUT:.0f}s waiting for workers "
            f"({len(group.members)}/{workers} connected)")
    log(f"INFO {what}: all {workers} worker(s) connected")
    return group


def worker(addr, port, rank, what, **info):
    """Join the head at addr:port, reach it at the address it advertises, then stay until the
    head goes away."""
    check_nccl(os.environ, local_devices(), f"{what} rank {rank}")
    info.update(host=os.environ.get("TESTBED_HOST_ID", ""), rank=rank)
    link = rendezvous.join(addr, port, info, CONNECT_TIMEOUT)
    if link is None:
        die(f"ERROR {what}: failed to connect to master {addr}:{port} "
            f"after {CONNECT_TIMEOUT:.0f}s")
    advertised = link.welcome.get("advertise")
    if advertised and rendezvous.status(advertised, port, timeout=CONNECT_TIMEOUT) is None:
        die(f"ERROR {what}: rank {rank} got no answer from the head's message queue at "
            f"tcp://{advertised}:{port} (the real engine waits here forever)")
    log(f"INFO {what}: rank {rank} connected to master {addr}:{port}")
    rendezvous.wait_closed(link)
    log(f"ERROR {what}: lost connection to master {addr}:{port}")
    sys.exit(1)
