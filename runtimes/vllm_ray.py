"""vLLM on a Ray cluster: Ray head and workers, then the serve command on the head."""

import re

from sparkrun_runtimes import ray_flow, vllm_distributed

NAME = "vllm-ray"
DEFAULT_COMMAND = vllm_distributed.DEFAULT_COMMAND


def serve_command(command: str) -> str:
    if re.search(r"--distributed-executor-backend[ =]", command):
        return command
    return f"{command} --distributed-executor-backend ray"


def plan(ctx):
    command = ctx.serve_command if ctx.nodes == 1 else serve_command(ctx.serve_command)
    return ray_flow.plan(ctx, command)


EXAMPLES = [
    (1, "vllm serve m", ["vllm serve m"]),
    (2, "vllm serve m -tp 2", [
        "ray start --head --port 46379 --node-ip-address {rendezvous} --include-dashboard false && "
        "for i in $(seq 600); do [ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge 2 ] && break; sleep 1; "
        "done && [ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge 2 ] || { echo 'sparkrun: not all 2 Ray "
        "nodes joined within 600 s' >&2; exit 1; }; exec vllm serve m -tp 2 --distributed-executor-backend ray",
        "ray start --address {rendezvous}:46379 --node-ip-address {worker1} --block",
    ]),
]
