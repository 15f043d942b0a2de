"""vLLM across nodes with its own torch.distributed rendezvous (no Ray).

Every node runs the serve command; the head (rank 0) listens on the init port, and each worker
joins it with its rank and `--headless`. Head first, then workers once the port listens.
"""

NAME = "vllm-distributed"

# The serve command of a recipe without `command`: the base, then (recipe default, flag) for each
# default that has a value. Flags of `vllm serve`: https://docs.vllm.ai/en/latest/cli/serve.html
DEFAULT_COMMAND = ("vllm serve {model}", (
    ("host", "--host"), ("port", "--port"), ("tensor_parallel", "-tp"), ("pipeline_parallel", "-pp"),
    ("gpu_memory_utilization", "--gpu-memory-utilization"), ("max_model_len", "--max-model-len"),
    ("served_model_name", "--served-model-name"),
))


def plan(ctx):
    if ctx.nodes == 1:
        return [ctx.start(0, ctx.serve_command)]
    steps = []
    for rank in range(ctx.nodes):
        command = (f"{ctx.serve_command} --nnodes {ctx.nodes} --node-rank {rank} "
                   f"--master-addr {ctx.rendezvous} --master-port {ctx.init_port}")
        steps.append(ctx.start(rank, command + (" --headless" if rank else "")))
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
