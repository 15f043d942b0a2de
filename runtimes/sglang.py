"""SGLang: solo, or every node with `--dist-init-addr head:port --nnodes N --node-rank r`."""

NAME = "sglang"

# The serve command of a recipe without `command` (see vllm_distributed.DEFAULT_COMMAND). SGLang's
# server arguments: https://docs.sglang.io/advanced_features/server_arguments.html
DEFAULT_COMMAND = ("python3 -m sglang.launch_server --model-path {model}", (
    ("host", "--host"), ("port", "--port"), ("tensor_parallel", "--tp-size"), ("pipeline_parallel", "--pp-size"),
    ("gpu_memory_utilization", "--mem-fraction-static"), ("max_model_len", "--context-length"),
    ("served_model_name", "--served-model-name"),
))


def plan(ctx):
    if ctx.nodes == 1:
        return [ctx.start(0, ctx.serve_command)]
    return [ctx.start(rank, f"{ctx.serve_command} --dist-init-addr {ctx.rendezvous}:{ctx.init_port} "
                            f"--nnodes {ctx.nodes} --node-rank {rank}")
            for rank in range(ctx.nodes)]


EXAMPLES = [
    (1, "sglang serve --model-path m", ["sglang serve --model-path m"]),
    (2, "sglang serve --model-path m --tp 2", [
        "sglang serve --model-path m --tp 2 --dist-init-addr {rendezvous}:25000 --nnodes 2 --node-rank 0",
        "sglang serve --model-path m --tp 2 --dist-init-addr {rendezvous}:25000 --nnodes 2 --node-rank 1",
    ]),
]
