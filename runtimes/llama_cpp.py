"""llama.cpp's llama-server, solo; experimental multi-node: rpc-server on the workers, and
`--rpc w1:port,...` on the head once they listen. llama-server gets METRICS_FLAG: without it,
its /metrics answers 501."""

from sparkrun_runtimes import serving

NAME = "llama-cpp"
ENGINE = serving.LLAMA_SERVER

# The serve command of a recipe without `command` (see vllm_distributed.DEFAULT_COMMAND); no
# parallelism or memory fraction flags. llama-server's options: tools/server/README.md in llama.cpp.
DEFAULT_COMMAND = ("llama-server -hf {model}", (
    ("host", "--host"), ("port", "--port"), ("max_model_len", "--ctx-size"), ("served_model_name", "--alias"),
))
# llama-server's /metrics (llama.cpp tools/server/README.md, "GET /metrics").
METRICS = {
    "running": ("llamacpp:requests_processing",),
    "waiting": ("llamacpp:requests_deferred",),
    "prompt_tokens": ("llamacpp:prompt_tokens_total",),
    "generation_tokens": ("llamacpp:tokens_predicted_total",),
    "kv_cache": ("llamacpp:kv_cache_usage_ratio",),
}
METRICS_FLAG = "--metrics"


def plan(ctx):
    if ctx.nodes == 1:
        return [ctx.start(0, ctx.serve_command)]
    steps, endpoints = [], []
    for rank in range(1, ctx.nodes):
        address = ctx.host_addresses[ctx.hosts[rank]]
        steps.append(ctx.start(rank, f"rpc-server --host {address} --port {ctx.init_port}"))
        steps.append(ctx.wait_port(rank, address, ctx.init_port, "llama.cpp rpc-server"))
        endpoints.append(f"{address}:{ctx.init_port}")
    return steps + [ctx.start(0, f"{ctx.serve_command} --rpc {','.join(endpoints)}")]


EXAMPLES = [
    (1, "llama-server -m /m.gguf --port 8000", ["llama-server -m /m.gguf --port 8000 --metrics"]),
    (1, "llama-server -m /m.gguf --metrics", ["llama-server -m /m.gguf --metrics"]),
    (2, "llama-server -m /m.gguf", [
        "rpc-server --host {worker1} --port 50052",
        "llama-server -m /m.gguf --metrics --rpc {worker1}:50052",
    ]),
]
