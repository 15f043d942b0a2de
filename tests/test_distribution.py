"""Image and model distribution with real rsync and ssh, and the offline behaviour."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import H1, H2, H3

from hubserver import FakeHub, make_gguf_repo, make_safetensors_repo
from testbed.fakedocker.store import Store, normalize_ref, payload_chunks

VLLM_IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
LLAMA_IMAGE = "scitrera/dgx-spark-llama-cpp:b8094-cu131"
MODEL = "Qwen/Qwen3-1.7B"
# Three Sparks, one replica each: its 16 attention heads do not split over tensor parallel 3.
THREE_REPLICAS = ("-o", "data_parallel=3")
GGUF_MODEL = "Qwen/Qwen3-1.7B-GGUF"


@pytest.fixture(scope="module")
def hub():
    repos = {MODEL: make_safetensors_repo(n_files=2, size=3 << 20), GGUF_MODEL: make_gguf_repo(size=1 << 20)}
    with FakeHub(repos) as server:
        yield server


def online(hub):
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1"}


def control_image(lab, name, size=1 << 20):
    meta = {"RepoTags": [normalize_ref(name)], "Entrypoint": None, "Cmd": ["/bin/bash"], "Env": []}
    return Store(lab.control_state).install_image(meta, payload_chunks(name, size), False)["Id"]


def files_of(root: Path) -> dict:
    """relative path -> (kind, content hash or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run(lab, *args, env=None):
    return lab("run", *map(str, args), "--no-follow", env=env, timeout=240)


def test_model_download_and_sync_to_three_hosts_keeps_the_cache_layout(bed, hub):
    control_image(bed, VLLM_IMAGE)
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}", *THREE_REPLICAS, env=online(hub))
    assert result.returncode == 0, result.stderr
    local = bed.home / "hf" / "hub" / "models--Qwen--Qwen3-1.7B"
    want = {k: v for k, v in files_of(local).items() if not k.startswith(("trees/", ".no_exist"))}
    assert any(v[0] == "link" and v[1].startswith("../../blobs/") for v in want.values())
    for host in bed.bed.hosts:
        remote = host.home / ".cache/huggingface/hub/models--Qwen--Qwen3-1.7B"
        assert files_of(remote) == want
        for link in (remote / "snapshots").rglob("*.safetensors"):
            assert link.is_symlink() and link.resolve().is_file()
    # Containers are told to stay offline, and every host got the same image by save/load.
    image_ids = {c["image_id"] for h in bed.bed.hosts for c in h.containers()}
    assert len(image_ids) == 1
    env = bed.bed.hosts[0].containers()[0]["env"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert ["load"] in [c[:1] for c in bed.bed.hosts[1].docker_calls()]
    assert bed("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}").returncode == 0

    # Second run: nothing moves, the Hub is not needed at all.
    hub.clear()
    for host in bed.bed.hosts:
        host.clear_docker_calls()
    start = time.monotonic()
    again = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}", *THREE_REPLICAS,
                env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert again.returncode == 0, again.stderr
    assert f"Model {MODEL}: already on every host" in again.stderr
    assert "Image" not in again.stderr and hub.requests == []
    assert not any(c[:1] == ["load"] for h in bed.bed.hosts for c in h.docker_calls())
    assert time.monotonic() - start < 30
    bed("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}", check=0)


def seed_local_model(lab, hub_url, model=MODEL, pattern=None):
    env = dict(lab.env, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub_url, HF_HUB_DISABLE_PROGRESS_BARS="1")
    code = (f"from huggingface_hub import snapshot_download; "
            f"snapshot_download({model!r}, cache_dir={str(lab.home / 'hf' / 'hub')!r}, allow_patterns={pattern!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def test_host_with_the_model_is_skipped_and_a_partial_transfer_resumes(bed, hub):
    control_image(bed, VLLM_IMAGE)
    seed_local_model(bed, hub.url)
    local = bed.home / "hf" / "hub" / "models--Qwen--Qwen3-1.7B"
    # Host 1 already has it all; host 2 has half of the biggest blob (an interrupted transfer).
    host1_hub = bed.bed.hosts[0].home / ".cache/huggingface/hub"
    host1_hub.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(local), str(host1_hub)], check=True)
    blob = max((local / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    partial = bed.bed.hosts[1].home / ".cache/huggingface/hub/models--Qwen--Qwen3-1.7B/blobs" / blob.name
    partial.parent.mkdir(parents=True)
    partial.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "-vv")
    assert result.returncode == 0, result.stderr
    assert f"Model {MODEL} " in result.stderr and f"-> {H2}" in result.stderr
    assert f"[{H1}] model synced" not in result.stderr
    sent = [l for l in result.stderr.splitlines() if l.startswith(f"[{H2}] model synced")]
    total = sum(p.stat().st_size for p in (local / "blobs").iterdir())
    sent_mib = float(sent[0].split(": ")[1].split(" MiB")[0])
    assert sent_mib * 2**20 < total - blob.stat().st_size // 4  # the half already there was not sent again
    assert partial.read_bytes() == blob.read_bytes()
    bed("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", check=0)


def test_gguf_quant_selection_with_split_files_and_hf_rewrite(bed, hub):
    control_image(bed, LLAMA_IMAGE)
    recipe = bed.home / "split.yaml"
    recipe.write_text(f"model: {GGUF_MODEL}:Q4_K_M\nruntime: llama-cpp\ncontainer: {LLAMA_IMAGE}\n"
                      "defaults: {served_model_name: q4}\n"
                      "command: llama-server -hf {model} --alias {served_model_name} --host {host} --port {port}\n")
    result = run(bed, recipe, "-H", H2, env=online(hub))
    assert result.returncode == 0, result.stderr
    snapshots = bed.bed.hosts[1].home / ".cache/huggingface/hub/models--Qwen--Qwen3-1.7B-GGUF/snapshots"
    synced = sorted(p.relative_to(next(snapshots.iterdir())).as_posix() for p in snapshots.rglob("*.gguf"))
    assert synced == ["Q4_K_M/Qwen3-1.7B-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/Qwen3-1.7B-Q4_K_M-00002-of-00002.gguf"]
    command = bed.bed.hosts[1].containers()[0]["command"][-1]
    assert "-hf " not in command
    assert "-m /root/.cache/huggingface/hub/models--Qwen--Qwen3-1.7B-GGUF/snapshots/" in command
    assert command.split("-m ")[1].split()[0].endswith("Q4_K_M/Qwen3-1.7B-Q4_K_M-00001-of-00002.gguf")
    local = bed.home / "hf/hub/models--Qwen--Qwen3-1.7B-GGUF/snapshots"
    assert not list(local.rglob("*Q8_0*"))  # only the one quant was downloaded
    bed("stop", "--all", "-H", H2, check=0)


def test_image_copied_from_a_host_when_this_machine_has_none(bed):
    image_id = bed.bed.hosts[2].add_image(VLLM_IMAGE, size_bytes=2 << 20)
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}", *THREE_REPLICAS, "--no-sync")
    assert result.returncode == 0, result.stderr
    assert f"Image {VLLM_IMAGE}: copying from {H3} to {H1}, {H2}" in result.stderr
    assert {c["image_id"] for h in bed.bed.hosts for c in h.containers()} == {image_id}
    assert not any(c[:1] == ["load"] for c in bed.bed.hosts[2].docker_calls())
    bed("stop", "--all", "-H", f"{H1},{H2},{H3}", check=0)


def test_image_nowhere_and_no_registry_is_a_clear_error(bed):
    result = run(bed, "qwen3-1.7b-vllm", "-H", H1, "--no-sync")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: image {VLLM_IMAGE} is on none of {H1} (for their platform) and could not be pulled on {H1} "
        "or here; load it on this machine or on one host (docker load -i FILE), or pass --image")
    assert bed.bed.hosts[0].containers() == []


def test_offline_with_model_cached_proceeds_without_the_hub(bed, hub):
    control_image(bed, VLLM_IMAGE)
    seed_local_model(bed, hub.url)
    hub.clear()
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    result = run(bed, "qwen3-1.7b-vllm", "-H", H1, env=env)
    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    bed("stop", "--all", "-H", H1, check=0)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_with_nothing_cached_fails_fast_and_says_what_to_provide(bed, env):
    control_image(bed, VLLM_IMAGE)
    start = time.monotonic()
    result = run(bed, "qwen3-1.7b-vllm", "-H", H1, env=env)
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and elapsed < 10
    assert "model Qwen/Qwen3-1.7B is not in the local Hugging Face cache" in result.stderr
    assert "--cache-dir" in result.stderr and bed.bed.hosts[0].containers() == []


def test_dry_run_touches_no_network(bed, hub):
    hub.clear()
    for host in bed.bed.hosts:
        host.reset_connections()
    result = bed("run", "qwen3-1.7b-llama-cpp", "-H", H1, "--dry-run", env=online(hub))
    assert result.returncode == 0 and hub.requests == []
    assert bed.bed.hosts[0].connection_count() == 0


def test_pending_operations_shown_and_stale_ones_cleaned(bed):
    pending = Path(bed.env["SPARKRUN_CACHE_DIR"]) / "pending"
    pending.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (pending / "live.json").write_text(f'{{"pid": {sleeper.pid}, "what": "model org/x", "hosts": ["{H1}"], "started": 0}}')
        (pending / "stale.json").write_text('{"pid": 999999, "what": "model org/y", "hosts": ["h"], "started": 0}')
        out = bed("status", "-H", H1, "--no-probe", check=0).stdout
        assert f"Pending: model org/x (pid {sleeper.pid}) to {H1}" in out and "org/y" not in out
        assert not (pending / "stale.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        (pending / "live.json").unlink(missing_ok=True)
