"""vLLM across nodes with its own torch.distributed rendezvous (no Ray).

Every node runs the serve command; the head (rank 0) listens on the init port, and each worker
joins it with its rank and `--headless`. Head first, then workers once the port listens.

Data parallel (one replica per node): the head serves and listens on the data-parallel RPC port
(`--data-parallel-address`/`--data-parallel-rpc-port`); every other node runs its replica's
engine `--headless` from `--data-parallel-start-rank`.

Each node's VLLM_HOST_IP is its rendezvous address: vLLM would otherwise advertise the default
route's address (or 0.0.0.0 with none), which the other nodes may not reach.
"""

import re

from sparkrun import UsageError
from sparkrun_runtimes import serving, torch_engines

NAME = "vllm-distributed"
ENGINE = serving.VLLM
# Hugging Face repos a vLLM command names besides the model, which every host needs in its cache
# (the containers run with HF_HUB_OFFLINE=1): flag -> (role, key of a JSON value or None).
# vLLM's engine arguments: --tokenizer, --speculative-config '{"model": ...}', and the older
# --speculative-model (https://docs.vllm.ai/en/latest/configuration/engine_args.html).
REPO_FLAGS = {"--tokenizer": ("tokenizer", None), "--speculative-config": ("draft model", "model"),
              "--speculative-model": ("draft model", None)}
ENV = torch_engines.ENV
CACHE_ENGINE, CACHES = "vllm", torch_engines.VLLM_CACHES
SPLITS_HEADS = torch_engines.splits_heads
DATA_PARALLEL_SIZE = re.compile(r"(?:--data-parallel-size|-dp)[ =]")
# The flags plan() adds came with multi-node serving without Ray (vLLM PR #23691, "[V1] Support MP
# Executor for multi node distributed inference"); an older image's vLLM refuses them with
# argparse's "unrecognized arguments: --nnodes 2 --node-rank 0 ...".
FAILURE_HINTS = (
    (re.compile(r"unrecognized arguments:.*--(?:nnodes|node-rank|master-addr|master-port|headless)\b"),
     "this image's vLLM predates multi-node serving without Ray (vLLM PR #23691): set "
     "distributed_executor_backend: ray in the recipe (runtime vllm-ray), or use a newer vLLM image"),
)


def node_env(ctx, rank: int) -> tuple:
    return (("VLLM_HOST_IP", ctx.address(rank)),)


def data_parallel_plan(ctx):
    if ctx.nodes != ctx.data_parallel:
        raise UsageError(f"vLLM's multi-node data parallel runs one replica per node: {ctx.data_parallel} replicas "
                         f"on {ctx.nodes} nodes would split replicas across Sparks; set tensor and pipeline "
                         "parallel to 1, or use Ray (distributed_executor_backend: ray)")
    command = ctx.serve_command
    if not DATA_PARALLEL_SIZE.search(command):
        command += f" --data-parallel-size {ctx.data_parallel}"
    command += (f" --data-parallel-size-local 1 --data-parallel-address {ctx.rendezvous} "
                f"--data-parallel-rpc-port {ctx.init_port}")
    steps = [ctx.start(0, command, node_env(ctx, 0)),
             ctx.wait_port(0, ctx.rendezvous, ctx.init_port, "vLLM data-parallel RPC")]
    return steps + [ctx.start(rank, f"{command} --data-parallel-start-rank {rank} --headless", node_env(ctx, rank))
                    for rank in range(1, ctx.nodes)]


# The serve command of a recipe without `command`: the base, then (recipe default, flag) for each
# default that has a value. Flags of `vllm serve`: https://docs.vllm.ai/en/latest/cli/serve.html
DEFAULT_COMMAND = ("vllm serve {model}", (
    ("host", "--host"), ("port", "--port"), ("tensor_parallel", "-tp"), ("pipeline_parallel", "-pp"),
    ("gpu_memory_utilization", "--gpu-memory-utilization"), ("max_model_len", "--max-model-len"),
    ("served_model_name", "--served-model-name"),
))
# vLLM's /metrics (https://docs.vllm.ai/en/stable/usage/metrics/); V1 engines renamed
# gpu_cache_usage_perc to kv_cache_usage_perc.
METRICS = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}


def plan(ctx):
    if ctx.nodes == 1:
        return [ctx.start(0, ctx.serve_command)]
    if ctx.data_parallel > 1:
        return data_parallel_plan(ctx)
    steps = []
    for rank in range(ctx.nodes):
        command = (f"{ctx.serve_command} --nnodes {ctx.nodes} --node-rank {rank} "
                   f"--master-addr {ctx.rendezvous} --master-port {ctx.init_port}")
        steps.append(ctx.start(rank, command + (" --headless" if rank else ""), node_env(ctx, rank)))
        if rank == 0:
            steps.append(ctx.wait_port(0, ctx.rendezvous, ctx.init_port, "torch.distributed rendezvous"))
    return steps


# (nodes, serve command, expected container commands in launch order)
EXAMPLES = [
    (1, "vllm serve m --port 8000", ["vllm serve m --port 8000"]),
    (2, "vllm serve m -tp 2", [
        "vllm serve m -tp 2 --nnodes 2 --node-rank 0 --master-addr {rendezvous} --master-port 29501",
        "vllm serve m -tp 2 --nnodes 2 --node-rank 1 --master-addr {rendezvous} --master-port 29501 --headless",
    ]),
]
