"""Fake SGLang: `python3 -m sglang.launch_server ...` and `sglang serve ...`."""
import os
import sys

from . import distributed, metrics, openai
from .common import (advertised_ip, check_model_path, die, gpu_free_mib, log, loose_args, real_addr,
                     shared_memory_segment, start_faults)

IMBALANCE_CHECK = "SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"

VALUES = {"model-path", "model", "served-model-name", "host", "port", "tp", "tp-size",
          "nnodes", "node-rank", "dist-init-addr", "mem-fraction-static",
          "api-key"}
BOOLS = {"trust-remote-code", "enable-metrics"}


def launch_server(args):
    opts, _ = loose_args(args, VALUES, BOOLS)
    model = opts.get("model-path") or opts.get("model")
    if not model:
        die("launch_server.py: error: the following arguments are required: --model-path", 2)
    host = opts.get("host") or "127.0.0.1"
    port = int(opts.get("port") or 30000)
    log(f"[{os.getpid()}] server_args=ServerArgs(model_path='{model}', host='{host}', port={port})")
    shared_memory_segment()
    start_faults("RuntimeError: Initialization failed. (sglang scheduler exited)")
    check_model_path(model)
    nnodes, rank = int(opts.get("nnodes") or 1), int(opts.get("node-rank") or 0)
    if nnodes > 1:
        addr, _, dist_port = (opts.get("dist-init-addr") or "127.0.0.1:5000").rpartition(":")
        if rank > 0:
            distributed.worker(addr, int(dist_port), rank, "sglang", free_mib=gpu_free_mib())
        group = distributed.head(int(dist_port), nnodes - 1, "sglang", advertised_ip("SGLANG_HOST_IP", "HOST_IP"))
        check_memory_balance([gpu_free_mib()] + [m.get("free_mib", 0) for m in group.members.values()])
    log("Load weight end. type=FakeModel, avail mem=100.00 GB")
    name = opts.get("served-model-name") or model
    metrics.hold_gpu_memory(opts.get("mem-fraction-static") or 0.85, "sglang::scheduler")
    meter = metrics.Meter(metrics.SGLANG, f'model_name="{name}"') if opts.get("enable-metrics") else None
    openai.serve(openai.Served("sglang", name, model, meter=meter, api_key=opts.get("api-key")),
                 real_addr(host), port, [
                     f"INFO:     Started server process [{os.getpid()}]",
                     "INFO:     Application startup complete.",
                     f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)",
                     "The server is fired up and ready to roll!"])


def check_memory_balance(free):
    """SGLang refuses to start when a rank's free GPU memory is under 90% of another's, unless
    SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK is off (sglang/srt/model_executor/model_runner.py)."""
    if min(free) < max(free) * 0.9 and os.environ.get(IMBALANCE_CHECK, "1").lower() not in ("0", "false"):
        die("ValueError: The memory capacity is unbalanced. Some GPUs may be occupied by other processes. "
            f"min_per_gpu_memory={min(free) / 1024:.2f} GB, local_gpu_memory={max(free) / 1024:.2f} GB")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    launch_server(argv)
    return 0
