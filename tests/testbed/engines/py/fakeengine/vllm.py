"""Fake `vllm` CLI: `vllm serve MODEL [...]`."""
import os
import sys
import time

from . import distributed, openai, ray
from .common import check_model_path, die, log, loose_args, real_addr, start_faults

VERSION = "0.11.0"
VALUES = {"model", "served-model-name", "host", "port", "nnodes", "node-rank",
          "master-addr", "master-port", "tensor-parallel-size", "tp",
          "pipeline-parallel-size", "pp", "distributed-executor-backend", "max-model-len"}
BOOLS = {"headless", "trust-remote-code", "enforce-eager"}


def vlog(message, where="api_server.py:1885", level="INFO"):
    log(f"{level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}")


def serve(args):
    model = args[0] if args and not args[0].startswith("-") else None
    opts, _ = loose_args(args[1:] if model else args, VALUES, BOOLS)
    model = model or opts.get("model") or "facebook/opt-125m"
    name = opts.get("served-model-name") or model
    port = int(opts.get("port") or 8000)
    vlog(f"vLLM API server version {VERSION}")
    vlog(f"non-default args: model={model!r}, port={port}")
    start_faults("ERROR: EngineCore failed to start (RuntimeError: CUDA error: no kernel image)")
    check_model_path(model)
    nnodes, rank = int(opts.get("nnodes") or 1), int(opts.get("node-rank") or 0)
    master = opts.get("master-addr") or "127.0.0.1"
    master_port = int(opts.get("master-port") or 29501)
    if opts.get("headless") or rank > 0:
        distributed.worker(master, master_port, rank, "vllm")
    if nnodes > 1:
        distributed.head(master_port, nnodes - 1, "vllm")
    else:
        check_ray_world(opts)
    vlog("Loading weights took 0.01 GiB and 0.1 seconds", "default_loader.py:267")
    vlog(f"Starting vLLM API server 0 on http://{opts.get('host') or '0.0.0.0'}:{port}",
         "launcher.py:34")
    bind = real_addr(opts.get("host") or "")
    openai.serve(openai.Served("vllm", name, model), bind, port, [
        f"INFO:     Started server process [{os.getpid()}]",
        "INFO:     Waiting for application startup.",
        "INFO:     Application startup complete.",
        f"INFO:     Uvicorn running on http://{opts.get('host') or '0.0.0.0'}:{port} "
        "(Press CTRL+C to quit)"])


def check_ray_world(opts):
    """With TP*PP > 1 GPU (one per host) vLLM needs a Ray cluster that big."""
    world = int(opts.get("tensor-parallel-size") or opts.get("tp") or 1) * \
        int(opts.get("pipeline-parallel-size") or opts.get("pp") or 1)
    if world <= 1:
        return
    nodes = ray.cluster_nodes()
    if nodes is None:
        die("ValueError: The number of required GPUs exceeds the total number of available "
            f"GPUs in the placement group. (world size {world}, no Ray cluster)")
    if nodes < world:
        die("ValueError: The number of required GPUs exceeds the total number of available "
            f"GPUs in the placement group. ({world} required, {nodes} available)")
    vlog(f"Using Ray cluster with {nodes} nodes for world size {world}", "ray_utils.py:300")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(VERSION)
        return 0
    if argv[:1] != ["serve"]:
        die("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...\n"
            f"vllm: error: argument subparser: invalid choice: {argv[:1]}", 2)
    serve(argv[1:])
    return 0
