"""Fake llama.cpp: `llama-server` and `rpc-server`."""
import os
import sys
import threading

from . import distributed, metrics, openai, rendezvous
from .common import check_model_path, die, host_path, log, loose_args, real_addr, start_faults

# Draft model flags: tools/server/README.md in llama.cpp.
DRAFT_FILE_FLAGS = ("md", "model-draft", "spec-draft-model")
DRAFT_REPO_FLAGS = ("hfd", "hfrd", "hf-repo-draft", "spec-draft-hf")
SERVER_VALUES = {"m", "model", "hf", "hf-repo", "hfr", "a", "alias", "host", "port", "rpc",
                 "c", "ctx-size", "ngl", "n-gpu-layers", "api-key", "fa", "flash-attn",
                 "split-mode", "sm", "mm", "mmproj", *DRAFT_FILE_FLAGS, *DRAFT_REPO_FLAGS}
SERVER_BOOLS = {"metrics"}
RPC_VALUES = {"H", "host", "p", "port", "c", "cache"}
# tools/server/server.cpp: while the model loads, and /metrics without --metrics
LOADING = (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
NO_METRICS = (501, {"error": {"code": 501, "message": "This server does not support metrics endpoint. "
                              "Start it with `--metrics`", "type": "not_supported_error"}})


def connect_rpc(servers):
    """Connect to every --rpc server (kept open while serving)."""
    links = []
    for server in filter(None, servers.split(",")):
        addr, _, port = server.rpartition(":")
        sock = rendezvous.join(addr, int(port), {"host": os.environ.get("TESTBED_HOST_ID", ""),
                                                 "role": "llama-server"},
                               distributed.CONNECT_TIMEOUT)
        if sock is None:
            die(f"failed to connect to RPC server at {server}")
        log(f"load_backend: connected to RPC server {server}")
        links.append(sock)
    return links


def hf_cache_file(repo):
    """Where llama-server (b8000-era builds) keeps a `-hf user/repo:QUANT` download: one file in
    ~/.cache/llama.cpp named after the repo (common/arg.cpp, common_get_hf_file)."""
    name, _, quant = repo.partition(":")
    return f"/root/.cache/llama.cpp/{name.replace('/', '_')}_{(quant or 'Q4_K_M').lower()}.gguf"


def load_draft(opts):
    """Load the draft model after the main one, as llama-server does: a missing -md file fails the
    load and the server exits 1 (tools/server/server.cpp, load_model: "failed to load draft
    model"; main: "exiting due to model loading error"). A -hfd repo is fetched into its cache."""
    draft = next((opts[f] for f in DRAFT_FILE_FLAGS if f in opts), None)
    repo = next((opts[f] for f in DRAFT_REPO_FLAGS if f in opts), None)
    if draft is None and repo is None:
        return
    draft = draft or hf_cache_file(repo)
    log(f"srv    load_model: loading draft model '{draft}'")
    if not repo and not os.path.exists(host_path(draft)):
        log(f"llama_model_load: error loading model: failed to open {draft}: No such file or directory")
        log(f"srv    load_model: failed to load draft model, '{draft}'")
        die("main: exiting due to model loading error")


def server_main(argv=None):
    opts, positionals = loose_args(sys.argv[1:] if argv is None else argv, SERVER_VALUES, SERVER_BOOLS)
    if positionals:  # common_params_parse takes no positional arguments
        die(f"error: invalid argument: {positionals[0]}")
    model = opts.get("m") or opts.get("model")
    repo = opts.get("hf") or opts.get("hf-repo") or opts.get("hfr")
    if not model and not repo:
        die("error: no model specified (use -m or -hf)")
    host, port = opts.get("host") or "127.0.0.1", int(opts.get("port") or 8080)
    log("build: 6000 (fake) with cc for aarch64-linux-gnu\nsystem info: n_threads = 20")
    if model:
        check_model_path(model)
    links = connect_rpc(opts.get("rpc") or "")
    # /v1/models lists --alias, else the path of the model file it loaded (tools/server/server.cpp).
    model_id = opts.get("a") or opts.get("alias") or model or hf_cache_file(repo)
    api_key = opts.get("api-key") or os.environ.get("LLAMA_API_KEY")
    meter = metrics.Meter(metrics.LLAMACPP) if opts.get("metrics") else None
    served = openai.Served("llamacpp", model_id, model or repo, meter=meter, no_metrics=NO_METRICS,
                           api_key=api_key)

    def load():
        start_faults("llama_model_load: error loading model: tensor data is not within file bounds")
        log(f"llama_model_loader: loaded meta data from {model or repo} ({len(links)} RPC servers)")
        load_draft(opts)
        metrics.hold_gpu_memory(0.1, "llama-server")

    # Like llama-server, listen first and answer 503 "Loading model" until the model is loaded.
    log(f"main: HTTP server is listening, hostname: {host}, port: {port}, http threads: 19")
    openai.serve(served, real_addr(host), port, [
        f"main: server is listening on http://{host}:{port} - starting the main loop",
        "srv  update_slots: all slots are idle"], load, LOADING)
    return 0


def rpc_main(argv=None):
    opts, _ = loose_args(sys.argv[1:] if argv is None else argv, RPC_VALUES)
    host = opts.get("H") or opts.get("host") or "127.0.0.1"
    port = int(opts.get("p") or opts.get("port") or 50052)
    start_faults("ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected")
    rendezvous.Membership(host, port).start()
    log(f"Starting RPC server v3.0.0\n  endpoint       : {host}:{port}\n"
        "  local cache    : n/a\nDevices:\n  CUDA0: NVIDIA GB10 (122572 MiB, 120000 MiB free)")
    threading.Event().wait()
    return 0
