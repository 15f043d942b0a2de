"""vLLM on a Ray cluster: Ray head and workers, then the serve command on the head. With data
parallel, vLLM places the replicas on the Ray cluster itself (`--data-parallel-backend ray`)."""

import re

from sparkrun_runtimes import ray_flow, serving, vllm_distributed

NAME = "vllm-ray"
DEFAULT_COMMAND = vllm_distributed.DEFAULT_COMMAND
REPO_FLAGS = vllm_distributed.REPO_FLAGS
METRICS = vllm_distributed.METRICS
ENV, CACHE_ENGINE, CACHES = vllm_distributed.ENV, vllm_distributed.CACHE_ENGINE, vllm_distributed.CACHES
SPLITS_HEADS = vllm_distributed.SPLITS_HEADS
ENGINE = serving.VLLM
RAY_BACKEND = re.compile(r"\s*--distributed-executor-backend[ =]+ray\b")


def serve_command(command: str, data_parallel: int = 1) -> str:
    if not re.search(r"--distributed-executor-backend[ =]", command):
        command += " --distributed-executor-backend ray"
    if data_parallel > 1 and not re.search(r"--data-parallel-backend[ =]", command):
        command += " --data-parallel-backend ray"
    return command


def solo_command(command: str) -> str:
    """One node needs no Ray: eugr's launcher drops the Ray backend for a solo run, else vLLM
    would start a private Ray (with its memory monitor) inside the container."""
    return RAY_BACKEND.sub("", command)


def plan(ctx):
    command = solo_command(ctx.serve_command) if ctx.nodes == 1 else serve_command(ctx.serve_command, ctx.data_parallel)
    return ray_flow.plan(ctx, command)


EXAMPLES = [
    (1, "vllm serve m", ["vllm serve m"]),
    (1, "vllm serve m --distributed-executor-backend ray --port 8000", ["vllm serve m --port 8000"]),
    (2, "vllm serve m -tp 2", [
        "mkdir -p \"${VLLM_CONFIG_ROOT:-${XDG_CONFIG_HOME:-$HOME/.config}/vllm}\" && echo '[\"GLOO_SOCKET_IFNAME\", "
        "\"NCCL_IB_DISABLE\", \"NCCL_IB_GID_INDEX\", \"NCCL_IB_HCA\", \"NCCL_IB_MERGE_NICS\", "
        "\"NCCL_IB_SUBNET_AWARE_ROUTING\", \"NCCL_IGNORE_CPU_AFFINITY\", \"NCCL_NET\", \"NCCL_SOCKET_IFNAME\", "
        "\"UCX_NET_DEVICES\"]' > \"${VLLM_CONFIG_ROOT:-${XDG_CONFIG_HOME:-$HOME/.config}/vllm}/"
        "ray_non_carry_over_env_vars.json\" && "
        "ray start --head --port 46379 --node-ip-address {rendezvous} --include-dashboard false && "
        "for i in $(seq 600); do [ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge 2 ] && break; sleep 1; "
        "done && [ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge 2 ] || { echo 'sparkrun: not all 2 Ray "
        "nodes joined within 600 s' >&2; exit 1; }; exec vllm serve m -tp 2 --distributed-executor-backend ray",
        "ray start --address {rendezvous}:46379 --node-ip-address {worker1} --block",
    ]),
]
