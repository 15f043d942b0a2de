"""llama.cpp's llama-server, solo; experimental multi-node: rpc-server on the workers, and
`--rpc w1:port,...` on the head once they listen. llama-server gets METRICS_FLAG: without it,
its /metrics answers 501."""

import re

from sparkrun_runtimes import serving

NAME = "llama-cpp"
ENGINE = serving.LLAMA_SERVER

# Per role, the flags naming a Hugging Face repo `<user>/<model>[:quant]` that llama-server downloads
# itself, and the flag naming a local GGUF file instead (tools/server/README.md in llama.cpp:
# `-hf, -hfr, --hf-repo` and `-m`; `--spec-draft-hf, -hfd, -hfrd, --hf-repo-draft` and
# `--spec-draft-model, -md, --model-draft`).
HF_REPO_FLAGS = {"model": (("-hf", "-hfr", "--hf-repo"), "-m"),
                 "draft model": (("--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft"), "-md")}
REPO_FLAGS = dict.fromkeys(HF_REPO_FLAGS["draft model"][0], ("draft model", None))
# A repo named without a quant: llama-server loads its Q4_K_M file, else its Q8_0 one, else its
# first model file (common/download.cpp, find_best_model).
GGUF_QUANTS = ("Q4_K_M", "Q8_0")
# Flags that name a projector or refuse one: the command then gets none added.
PROJECTOR_FLAGS = re.compile(r"(?:^|\s)(?:-mm|--mmproj|--no-mmproj)\b")

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


def use_synced_files(command: str, synced) -> str:
    """The serve command pointed at GGUF files synced to the hosts instead of the repos llama-server
    would download: `-hf REPO` -> `-m FILE`, `-hfd REPO` -> `-md FILE`. synced: (role, repo as the
    command names it, its file, its multimodal projector or None) per repo. -hf fetches the repo's
    projector too (tools/server/README.md); `--mmproj FILE` names the synced one, unless the
    command names or refuses one. A draft repo's projector is never loaded (common/arg.cpp)."""
    for role, repo, path, projector in synced:
        if role not in HF_REPO_FLAGS:
            continue
        repo_flags, file_flag = HF_REPO_FLAGS[role]
        extra = f" --mmproj {projector}" if projector and not PROJECTOR_FLAGS.search(command) else ""
        command = re.sub(rf"(?<!\S)(?:{'|'.join(map(re.escape, repo_flags))})[ =]+{re.escape(repo)}(?=\s|$)",
                         f"{file_flag} {path}{extra}", command)
    return command


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
