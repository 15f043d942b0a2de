"""The Ray flow shared by vllm-ray and eugr-vllm.

The head container starts the Ray head, waits (bounded) until every node has joined, then runs
the serve command in the foreground, so its log and exit status are the container's own. Workers
join the head's Ray port and block.

Every node advertises one address, the one it uses for the rendezvous: Ray is started with it,
Ray's node-IP variables and vLLM's VLLM_HOST_IP carry it. Otherwise vLLM takes the default
route's address (the management network, or none in an offline lab), sees two addresses per
node and refuses ("Every node should have a unique IP address"), or waits for a placement
group on a node Ray does not have.
"""

import json
import shlex

JOIN_TIMEOUT_S = 600
# Ray's memory monitor counts the GPU's allocations as host memory on a Spark (unified memory)
# and kills workers near its threshold; Ray must not empty CUDA_VISIBLE_DEVICES when a node
# reports no accelerator of the requested kind.
RAY_ENV = (("RAY_memory_monitor_refresh_ms", "0"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"))
# vLLM copies the driver's VLLM_*/NCCL_*/UCX_*/HF_* variables to its Ray workers, except the
# names listed in this file of its config folder (vllm/ray/ray_env.py, VLLM_CONFIG_ROOT).
NON_CARRY_OVER = "${VLLM_CONFIG_ROOT:-${XDG_CONFIG_HOME:-$HOME/.config}/vllm}"
NON_CARRY_OVER_FILE = "ray_non_carry_over_env_vars.json"


def node_env(ctx, rank: int) -> tuple:
    address = ctx.address(rank)
    return (("VLLM_HOST_IP", address), ("RAY_NODE_IP_ADDRESS", address),
            ("RAY_OVERRIDE_NODE_IP_ADDRESS", address)) + RAY_ENV


def keep_worker_env(ctx) -> str:
    """Shell words that make vLLM leave each worker's own network variables alone."""
    names = shlex.quote(json.dumps(sorted(ctx.interface_env)))
    return f"mkdir -p \"{NON_CARRY_OVER}\" && echo {names} > \"{NON_CARRY_OVER}/{NON_CARRY_OVER_FILE}\""


def head_command(ctx, serve_command: str) -> str:
    dashboard = (f"--include-dashboard true --dashboard-host 0.0.0.0 --dashboard-port {ctx.dashboard_port}"
                 if ctx.dashboard else "--include-dashboard false")
    return (f"{keep_worker_env(ctx)} && "
            f"ray start --head --port {ctx.ray_port} --node-ip-address {ctx.rendezvous} {dashboard} && "
            f"for i in $(seq {JOIN_TIMEOUT_S}); do "
            f"[ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge {ctx.nodes} ] && break; sleep 1; done && "
            f"[ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge {ctx.nodes} ] || "
            f"{{ echo 'sparkrun: not all {ctx.nodes} Ray nodes joined within {JOIN_TIMEOUT_S} s' >&2; exit 1; }}; "
            f"exec {serve_command}")


def worker_command(ctx, rank: int) -> str:
    return f"ray start --address {ctx.rendezvous}:{ctx.ray_port} --node-ip-address {ctx.address(rank)} --block"


def plan(ctx, serve_command: str):
    if ctx.nodes == 1:
        return [ctx.start(0, serve_command)]
    steps = [ctx.start(0, head_command(ctx, serve_command), node_env(ctx, 0)),
             ctx.wait_port(0, ctx.rendezvous, ctx.ray_port, "Ray head")]
    return steps + [ctx.start(rank, worker_command(ctx, rank), node_env(ctx, rank)) for rank in range(1, ctx.nodes)]
