"""Fake `vllm` CLI: `vllm serve MODEL [...]`."""
import json
import os
import sys
import time

from . import compile_cache, distributed, metrics, openai, ray, rendezvous
from .common import (advertised_ip, check_model_path, die, local_devices, log, loose_args, real_addr,
                     shared_memory_segment, start_faults)

# vllm/ray/ray_env.py: the driver's variables with these prefixes are copied to every Ray worker,
# except the worker-specific ones (vllm/v1/executor/ray_executor.py) and the names listed in
# $VLLM_CONFIG_ROOT/ray_non_carry_over_env_vars.json.
CARRIED_PREFIXES = ("VLLM_", "LMCACHE_", "NCCL_", "UCX_", "HF_", "HUGGING_FACE_")
WORKER_SPECIFIC = {"VLLM_HOST_IP", "VLLM_HOST_PORT", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"}
# vllm/v1/executor/ray_utils.py waits this long (1800 s) for a placement group; bounded here.
PLACEMENT_GROUP_WAIT_S = float(os.environ.get("TESTBED_PLACEMENT_GROUP_WAIT", "3"))

VERSION = "0.11.0"
# Options of multi-node serving without Ray (vLLM PR #23691, opened 2025-08-26): the vLLM of an
# older image (0.10.1, of 2025-08-18, or before) has none of them, and its argparse refuses them
# with their values. An image says which vLLM it ships in TESTBED_VLLM_VERSION (its Env).
MULTI_NODE_OPTIONS = ("--nnodes", "--node-rank", "--master-addr", "--master-port")
LAST_WITHOUT_MULTI_NODE = (0, 10, 1)
VALUES = {"model", "served-model-name", "host", "port", "nnodes", "node-rank", "gpu-memory-utilization",
          "master-addr", "master-port", "tensor-parallel-size", "tp",
          "pipeline-parallel-size", "pp", "distributed-executor-backend", "max-model-len",
          "data-parallel-size", "dp", "data-parallel-size-local", "data-parallel-address",
          "data-parallel-rpc-port", "data-parallel-start-rank", "data-parallel-backend",
          "api-key"}
BOOLS = {"headless", "trust-remote-code", "enforce-eager"}
SHORT_FLAGS = {"-h", "-q", "-O", "-tp", "-pp", "-dp", "-cc"}  # vLLM's single-dash options


def version():
    return os.environ.get("TESTBED_VLLM_VERSION") or VERSION


def unrecognized(args):
    """Options vLLM does not define, which its argparse refuses, in order: single-dash ones
    (`vllm serve bash -c ...` from an image whose ENTRYPOINT is ["vllm", "serve"],
    vllm/entrypoints/cli/serve.py), and on an old vLLM the multi-node ones with their values."""
    old = tuple(int(part) for part in version().split(".")[:3]) <= LAST_WITHOUT_MULTI_NODE
    refused = []
    for i, arg in enumerate(args):
        if arg.startswith("-") and not arg.startswith("--") and arg.partition("=")[0] not in SHORT_FLAGS \
                and not arg[1:].replace(".", "").isdigit():
            refused.append(arg)
        elif old and arg.partition("=")[0] in MULTI_NODE_OPTIONS:
            refused += [arg] if "=" in arg or i + 1 == len(args) else [arg, args[i + 1]]
    return refused


def vlog(message, where="api_server.py:1885", level="INFO"):
    log(f"{level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}")


def serve(args):
    refused = unrecognized(args)
    if refused:
        die("usage: vllm serve [model_tag] [options]\n"
            f"vllm serve: error: unrecognized arguments: {' '.join(refused)}", 2)
    model = args[0] if args and not args[0].startswith("-") else None
    opts, _ = loose_args(args[1:] if model else args, VALUES, BOOLS)
    model = model or opts.get("model") or "facebook/opt-125m"
    name = opts.get("served-model-name") or model
    port = int(opts.get("port") or 8000)
    vlog(f"vLLM API server version {version()}")
    vlog(f"non-default args: model={model!r}, port={port}")
    shared_memory_segment()
    start_faults("ERROR: EngineCore failed to start (RuntimeError: CUDA error: no kernel image)")
    check_model_path(model)
    nnodes, rank = int(opts.get("nnodes") or 1), int(opts.get("node-rank") or 0)
    master = opts.get("master-addr") or "127.0.0.1"
    master_port = int(opts.get("master-port") or 29501)
    data_parallel, local_replicas = parallel_size(opts, "data-parallel-size", "dp"), \
        int(opts.get("data-parallel-size-local") or 0)
    if data_parallel > 1 and local_replicas and opts.get("distributed-executor-backend") != "ray":
        serve_data_parallel(opts, data_parallel, local_replicas)
    elif opts.get("headless") or rank > 0:
        distributed.worker(master, master_port, rank, "vllm")
    elif nnodes > 1:
        distributed.head(master_port, nnodes - 1, "vllm", advertised_ip("VLLM_HOST_IP", "HOST_IP"))
    else:
        check_ray_world(opts, data_parallel)
    vlog("Loading weights took 0.01 GiB and 0.1 seconds", "default_loader.py:267")
    compile_cache.vllm_compile(model, version())
    vlog(f"Starting vLLM API server 0 on http://{opts.get('host') or '0.0.0.0'}:{port}",
         "launcher.py:34")
    bind = real_addr(opts.get("host") or "")
    metrics.hold_gpu_memory(opts.get("gpu-memory-utilization") or 0.9, "VLLM::EngineCore")
    meter = metrics.Meter(metrics.VLLM, f'engine="0",model_name="{name}"')
    api_key = opts.get("api-key") or os.environ.get("VLLM_API_KEY")
    openai.serve(openai.Served("vllm", name, model, meter=meter, api_key=api_key), bind, port, [
        f"INFO:     Started server process [{os.getpid()}]",
        "INFO:     Waiting for application startup.",
        "INFO:     Application startup complete.",
        f"INFO:     Uvicorn running on http://{opts.get('host') or '0.0.0.0'}:{port} "
        "(Press CTRL+C to quit)"])


def parallel_size(opts, *names):
    return int(next((opts[n] for n in names if opts.get(n)), 1))


def serve_data_parallel(opts, size, local_replicas):
    """Multi-node data parallel: the node with the API server (start rank 0) takes the
    handshakes of the headless engines of every other rank on --data-parallel-rpc-port
    (vllm/v1/engine/utils.py)."""
    address = opts.get("data-parallel-address") or "127.0.0.1"
    port = int(opts.get("data-parallel-rpc-port") or 29550)
    start_rank = int(opts.get("data-parallel-start-rank") or 0)
    if opts.get("headless"):
        distributed.worker(address, port, start_rank, "vllm data parallel")
    distributed.head(port, size - local_replicas, "vllm data parallel", advertised_ip("VLLM_HOST_IP", "HOST_IP"))


def ray_ip(env, default_ip):
    return env.get("VLLM_HOST_IP") or env.get("HOST_IP") or default_ip or "0.0.0.0"


def non_carry_over():
    config = os.environ.get("VLLM_CONFIG_ROOT") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "vllm")
    try:
        with open(os.path.join(config, "ray_non_carry_over_env_vars.json")) as f:
            return set(json.load(f))
    except (OSError, ValueError):
        return set()


def check_ray_world(opts, data_parallel):
    """With TP*PP*DP > 1 GPU (one per host) vLLM needs a Ray cluster that big, a placement group
    on the node it runs on (its own address must be a Ray node's), one address per node, and
    each worker's NCCL variables as its node has them after vLLM copied the driver's."""
    world = parallel_size(opts, "tensor-parallel-size", "tp") * \
        parallel_size(opts, "pipeline-parallel-size", "pp") * data_parallel
    if world <= 1:
        return
    address = ray.cluster_address()
    head_ip, _, ray_port = (address or "").rpartition(":")
    members = rendezvous.status(head_ip, int(ray_port)) if address else None
    if members is None:
        die("ValueError: The number of required GPUs exceeds the total number of available "
            f"GPUs in the placement group. (world size {world}, no Ray cluster)")
    if 1 + len(members) < world:
        die("ValueError: The number of required GPUs exceeds the total number of available "
            f"GPUs in the placement group. ({world} required, {1 + len(members)} available)")
    driver_ip = advertised_ip("VLLM_HOST_IP", "HOST_IP")
    members = members[:world - 1]
    if driver_ip not in [head_ip] + [m["node_ip"] for m in members]:
        specs = [{"GPU": 1.0, f"node:{driver_ip}": 0.001}] + [{"GPU": 1.0}] * (world - 1)
        vlog(f"Waiting for creating a placement group of specs for 10 seconds. specs={specs}. Check `ray status` "
             "and `ray list nodes` to see if you have enough resources, and make sure the IP addresses used by "
             "ray cluster are the same as VLLM_HOST_IP environment variable specified in each node if you are "
             "running on a multi-node.", "ray_utils.py:238")
        time.sleep(PLACEMENT_GROUP_WAIT_S)
        die(f"ValueError: Cannot provide a placement group of placement_group_specs={specs} within 1800 seconds. "
            "See `ray status` and `ray list nodes` to make sure the cluster has enough resources.")
    distributed.check_nccl(os.environ, local_devices(), f"RayWorkerWrapper ip={driver_ip}")
    carried = {k: v for k, v in os.environ.items()
               if k.startswith(CARRIED_PREFIXES) and k not in WORKER_SPECIFIC | non_carry_over()}
    worker_ips = [driver_ip]
    for member in members:
        env = dict(member["env"], **carried)
        worker_ips.append(ray_ip(env, member["default_ip"]))
        rendezvous.tell(head_ip, int(ray_port), {"node_ip": member["node_ip"]}, {"actor_env": env})
        distributed.check_nccl(env, member["devices"], f"RayWorkerWrapper ip={worker_ips[-1]}")
    if len(set(worker_ips)) != 1 + len(members):
        die(f"RuntimeError: Every node should have a unique IP address. Got {1 + len(members)} nodes and "
            f"{len(set(worker_ips))} unique IP addresses {set(worker_ips)}. Please check your network "
            "configuration. If you set `VLLM_HOST_IP` environment variable, make sure it is unique for each node.")
    vlog(f"Using Ray cluster with {1 + len(members)} nodes for world size {world}", "ray_utils.py:300")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(version())
        return 0
    if argv[:1] != ["serve"]:
        die("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...\n"
            f"vllm: error: argument subparser: invalid choice: {argv[:1]}", 2)
    serve(argv[1:])
    return 0
