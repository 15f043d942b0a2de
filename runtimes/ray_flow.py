"""The Ray flow shared by vllm-ray and eugr-vllm.

The head container starts the Ray head, waits (bounded) until every node has joined, then runs
the serve command in the foreground, so its log and exit status are the container's own. Workers
join the head's Ray port and block.
"""

JOIN_TIMEOUT_S = 600


def head_command(ctx, serve_command: str) -> str:
    dashboard = (f"--include-dashboard true --dashboard-host 0.0.0.0 --dashboard-port {ctx.dashboard_port}"
                 if ctx.dashboard else "--include-dashboard false")
    return (f"ray start --head --port {ctx.ray_port} --node-ip-address {ctx.rendezvous} {dashboard} && "
            f"for i in $(seq {JOIN_TIMEOUT_S}); do "
            f"[ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge {ctx.nodes} ] && break; sleep 1; done && "
            f"[ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge {ctx.nodes} ] || "
            f"{{ echo 'sparkrun: not all {ctx.nodes} Ray nodes joined within {JOIN_TIMEOUT_S} s' >&2; exit 1; }}; "
            f"exec {serve_command}")


def worker_command(ctx, rank: int) -> str:
    address = ctx.host_addresses[ctx.hosts[rank]]
    return f"ray start --address {ctx.rendezvous}:{ctx.ray_port} --node-ip-address {address} --block"


def plan(ctx, serve_command: str):
    if ctx.nodes == 1:
        return [ctx.start(0, serve_command)]
    steps = [ctx.start(0, head_command(ctx, serve_command)),
             ctx.wait_port(0, ctx.rendezvous, ctx.ray_port, "Ray head")]
    return steps + [ctx.start(rank, worker_command(ctx, rank)) for rank in range(1, ctx.nodes)]
