"""SGLang: solo, or every node with `--dist-init-addr head:port --nnodes N --node-rank r`.

Across nodes, each node advertises SGLANG_HOST_IP (its rendezvous address; SGLang otherwise
takes the default route's), and the check that refuses to start when the nodes' free memory
differs by more than ~10% ("The memory capacity is unbalanced") is off: on a Spark, free GPU
memory includes whatever the page cache holds at that moment. Launches get METRICS_FLAG: without
it SGLang serves no /metrics.
"""

from sparkrun_runtimes import serving, torch_engines

NAME = "sglang"
# Repos an SGLang command names besides the model (server arguments --tokenizer-path and
# --speculative-draft-model-path, https://docs.sglang.ai/advanced_features/server_arguments.html).
REPO_FLAGS = {"--tokenizer-path": ("tokenizer", None), "--speculative-draft-model-path": ("draft model", None)}
ENV = torch_engines.ENV
CACHE_ENGINE, CACHES = "sglang", torch_engines.SGLANG_CACHES
SPLITS_HEADS = torch_engines.splits_heads
ENGINE = serving.SGLANG

# The serve command of a recipe without `command` (see vllm_distributed.DEFAULT_COMMAND). SGLang's
# server arguments: https://docs.sglang.io/advanced_features/server_arguments.html
DEFAULT_COMMAND = ("python3 -m sglang.launch_server --model-path {model}", (
    ("host", "--host"), ("port", "--port"), ("tensor_parallel", "--tp-size"), ("pipeline_parallel", "--pp-size"),
    ("gpu_memory_utilization", "--mem-fraction-static"), ("max_model_len", "--context-length"),
    ("served_model_name", "--served-model-name"),
))
# SGLang's /metrics (https://docs.sglang.io/references/production_metrics.html).
METRICS = {
    "running": ("sglang:num_running_reqs",),
    "waiting": ("sglang:num_queue_reqs",),
    "prompt_tokens": ("sglang:prompt_tokens_total",),
    "generation_tokens": ("sglang:generation_tokens_total",),
    "kv_cache": ("sglang:token_usage",),
}
METRICS_FLAG = "--enable-metrics"


def node_env(ctx, rank: int) -> tuple:
    return (("SGLANG_HOST_IP", ctx.address(rank)), ("SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK", "0"))


def plan(ctx):
    if ctx.nodes == 1:
        return [ctx.start(0, ctx.serve_command)]
    return [ctx.start(rank, f"{ctx.serve_command} --dist-init-addr {ctx.rendezvous}:{ctx.init_port} "
                            f"--nnodes {ctx.nodes} --node-rank {rank}", node_env(ctx, rank))
            for rank in range(ctx.nodes)]


EXAMPLES = [
    (1, "sglang serve --model-path m", ["sglang serve --model-path m --enable-metrics"]),
    (1, "sglang serve --model-path m --enable-metrics", ["sglang serve --model-path m --enable-metrics"]),
    (2, "sglang serve --model-path m --tp 2", [
        "sglang serve --model-path m --tp 2 --enable-metrics --dist-init-addr {rendezvous}:25000 --nnodes 2 "
        "--node-rank 0",
        "sglang serve --model-path m --tp 2 --enable-metrics --dist-init-addr {rendezvous}:25000 --nnodes 2 "
        "--node-rank 1",
    ]),
]
