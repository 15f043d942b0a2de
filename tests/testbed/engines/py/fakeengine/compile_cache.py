"""The compile cache a fake engine leaves on its host, which outlives the container only when mounted."""
import hashlib
import os

from .common import STATE, host_path, log


def written_path(path):
    """Where a write to `path` inside the container lands: the mounted host folder, else the
    container's own layer, which goes with the container."""
    mapped = host_path(path)
    if mapped != path:
        return mapped
    return str(STATE / "docker" / "layers" / os.environ.get("TESTBED_CONTAINER", "none")) + path


def vllm_compile(model, version, compile_range="(1, 8192)"):
    """vLLM's torch.compile cache: VLLM_CACHE_ROOT (default ~/.cache/vllm)/torch_compile_cache/
    <hash>/rank_0_0/backbone, reused when the same model and version start again. Log lines as
    vLLM's compilation/backends.py writes them."""
    root = os.environ.get("VLLM_CACHE_ROOT") or "/root/.cache/vllm"
    key = hashlib.sha256(f"{model}|{version}".encode()).hexdigest()[:10]
    folder = f"{root}/torch_compile_cache/{key}/rank_0_0/backbone"
    log(f"INFO [backends.py:1089] Using cache directory: {folder} for vLLM's torch.compile")
    artifact = os.path.join(written_path(folder), "computation_graph.py")
    if os.path.exists(artifact):
        log(f"INFO [backends.py:292] Directly load the compiled graph(s) for compile range {compile_range} "
            "from the cache, took 0.012 s")
        return
    os.makedirs(os.path.dirname(artifact), exist_ok=True)
    with open(artifact, "w") as f:
        f.write(f"# compiled graph of {model}\n")
    log(f"INFO [backends.py:218] Compiling a graph for compile range {compile_range} takes 0.05 s")
