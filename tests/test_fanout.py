"""Distribution from the best source, end to end on the bed: this machine sends each byte once,
hosts copy to each other over their CX7 addresses (bed.transfers() counts who sent what to whom),
downloads here or on the head, every repo a launch needs, the checks before copying, images by
platform and identity across image stores, and eugr's locally built images."""

import json
import os
import subprocess
from pathlib import Path

import pytest

import sparkrun
from conftest import H1, H2, H3
from hubserver import FakeHub, commit_sha_for, make_gguf_repo, make_safetensors_repo
from test_distribution import (LLAMA_IMAGE, MODEL, THREE_REPLICAS, VLLM_IMAGE, control_image, files_of, online, run,
                               seed_local_model)
from testbed.host import install_image
from testbed.fakedocker.store import Store

ALL = f"{H1},{H2},{H3}"
CONTROL = "control"  # this machine, in the bed's byte records
DRAFT, TOKENIZER, MMPROJ_GGUF = "org/Draft-0.6B", "org/Tokenizer", "org/Vision-GGUF"
MAIN_GGUF, DRAFT_GGUF = "org/Main-GGUF", "org/Draft-GGUF"
HUB_VENV = Path(os.environ.get("SPARKRUN_TEST_HUB_VENV", "/var/tmp/sparkrun-testdeps/hub-venv"))


def vision_gguf_repo():
    spec = make_gguf_repo("Vision", size=256 * 1024)
    spec["files"]["mmproj-Vision-F16.gguf"] = b"GGUF" + bytes(4096)
    spec["revision"] = commit_sha_for(spec["files"])
    return spec


def draft_gguf_repo():
    """Q8_0, a split Q4_K_M, a Q4_0 and a projector: a launch naming Q4_0 takes that file only."""
    spec = make_gguf_repo("Draft", size=128 * 1024, seed=3)
    spec["files"]["Draft-Q4_0.gguf"] = b"GGUF" + bytes(32 * 1024)
    spec["files"]["mmproj-Draft-F16.gguf"] = b"GGUF" + bytes(4096)
    spec["revision"] = commit_sha_for(spec["files"])
    return spec


@pytest.fixture(scope="module")
def hub():
    repos = {MODEL: make_safetensors_repo(n_files=2, size=4 << 20), DRAFT: make_safetensors_repo(size=1 << 20, seed=1),
             TOKENIZER: make_safetensors_repo(size=1 << 20, seed=2), MMPROJ_GGUF: vision_gguf_repo(),
             MAIN_GGUF: make_gguf_repo("Main", size=256 * 1024, seed=4), DRAFT_GGUF: draft_gguf_repo()}
    with FakeHub(repos) as server:
        yield server


@pytest.fixture
def mesh(bed):
    """The bed after `setup ssh`: every host logs in to every other."""
    if not bed.bed.isolated:
        pytest.skip("needs hosts with private home folders (mount namespaces)")
    bed("setup", "ssh", "-H", ALL, "--no-include-self", check=0)
    bed.bed.meter.reset()
    return bed


def model_size(bed, model=MODEL):
    blobs = bed.home / "hf" / "hub" / f"models--{model.replace('/', '--')}" / "blobs"
    return sum(p.stat().st_size for p in blobs.iterdir())


def sent_by(bed, source):
    """Bytes `source` sent to each address, over all its connections."""
    totals = {}
    for t in bed.bed.transfers():
        if t["from"] == source:
            totals[t["to"]] = totals.get(t["to"], 0) + t["sent"]
    return totals


def between_hosts(bed):
    return [t for t in bed.bed.transfers() if t["from"] != CONTROL]


def cache_entry(folder):
    """The files of a repo's cache folder that a copy carries (not the Hub client's own notes)."""
    return {k: v for k, v in files_of(folder).items() if not k.startswith(("trees/", ".no_exist"))}


def llama_recipe(bed, name: str, model: str, flags: str = "", tensor_parallel: int = 1):
    """A llama.cpp recipe serving `model` through `-hf` (plus `flags`), written to the bed's home."""
    recipe = bed.home / f"{name}.yaml"
    recipe.write_text(f"model: {model}\nruntime: llama-cpp\ncontainer: {LLAMA_IMAGE}\n"
                      f"defaults: {{served_model_name: {name}, tensor_parallel: {tensor_parallel}}}\n"
                      f"command: llama-server -hf {{model}} {flags}--alias {{served_model_name}} --host {{host}} --port {{port}}\n")
    return recipe


def host_repo(host, model):
    return host.home / ".cache/huggingface/hub" / f"models--{model.replace('/', '--')}"


def test_this_machine_sends_once_and_hosts_copy_over_cx7(mesh, hub):
    bed = mesh
    seed_local_model(bed, hub.url)
    control_image(bed, VLLM_IMAGE, size=2 << 20)
    result = run(bed, "qwen3-1.7b-vllm", "-H", ALL, *THREE_REPLICAS)
    assert result.returncode == 0, result.stderr
    size = model_size(bed) + (2 << 20)
    from_here = sent_by(bed, CONTROL)
    assert sum(from_here.values()) <= 1.05 * size, from_here
    assert from_here.get(H1, 0) >= size, (bed.bed.transfers(), result.stderr)
    assert from_here.get(H2, 0) < 200_000 and from_here.get(H3, 0) < 200_000
    peers = between_hosts(bed)
    for host in (H2, H3):
        carried = [t for t in peers if t["to"].startswith("127.10.1") and t["to"].endswith("." + host.rsplit(".", 1)[1])]
        assert sum(t["sent"] for t in carried) >= size * 0.95, peers
        assert all(t["from"].startswith("127.10.1") for t in carried)
    assert sparkrun.fast_path_hint(ALL.split(",")) not in result.stderr
    want = cache_entry(bed.home / "hf/hub/models--Qwen--Qwen3-1.7B")
    for host in bed.bed.hosts:
        assert cache_entry(host_repo(host, MODEL)) == want
        assert {i["arch"] for i in host.images()} == {"arm64"}
    bed("stop", "--all", "-H", ALL, check=0)

    bed.bed.meter.reset()
    again = run(bed, "qwen3-1.7b-vllm", "-H", ALL, *THREE_REPLICAS)
    assert again.returncode == 0, again.stderr
    assert f"Model {MODEL}: already on every host" in again.stderr and "Image" not in again.stderr
    assert sum(sent_by(bed, CONTROL).values()) < 200_000 and between_hosts(bed) == []
    bed("stop", "--all", "-H", ALL, check=0)


def test_without_host_logins_this_machine_sends_and_says_once_how_to_enable_the_fast_path(bed, hub):
    seed_local_model(bed, hub.url)
    control_image(bed, VLLM_IMAGE)
    result = run(bed, "qwen3-1.7b-vllm", "-H", ALL, *THREE_REPLICAS)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(sparkrun.fast_path_hint(ALL.split(","))) == 1
    from_here = sent_by(bed, CONTROL)
    assert all(from_here[h] >= model_size(bed) for h in ALL.split(","))
    for host in bed.bed.hosts:
        assert host_repo(host, MODEL).is_dir()
    bed("stop", "--all", "-H", ALL, check=0)


def test_model_only_on_a_host_is_copied_from_it_without_error(mesh, hub):
    bed = mesh
    control_image(bed, VLLM_IMAGE)
    seed_local_model(bed, hub.url)
    local = bed.home / "hf/hub/models--Qwen--Qwen3-1.7B"
    holder = host_repo(bed.bed.hosts[1], MODEL)
    holder.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(local), str(holder)], check=True)
    subprocess.run(["rm", "-rf", str(local)], check=True)
    bed.bed.meter.reset()
    result = run(bed, "qwen3-1.7b-vllm", "-H", ALL, *THREE_REPLICAS, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert f"(from {H2})" in result.stderr
    assert sum(sent_by(bed, CONTROL).values()) < 1.05 * (1 << 20) + 200_000  # the image only
    for host in bed.bed.hosts:
        assert cache_entry(host_repo(host, MODEL)) == cache_entry(holder)
    bed("stop", "--all", "-H", ALL, check=0)


@pytest.fixture
def head_python(bed):
    """The head's python3 has the Hub client (a system-Python venv: hosts have a private /root)."""
    if not (HUB_VENV / "bin" / "python3").exists():
        pytest.fail(f"{HUB_VENV} is missing: run .ci/run")
    wrapper = bed.bed.hosts[0].bin / "python3"  # run by its venv path, so that the venv counts
    wrapper.write_text(f"#!/bin/sh\nexec {HUB_VENV / 'bin' / 'python3'} \"$@\"\n")
    wrapper.chmod(0o755)
    yield
    wrapper.unlink()


def test_download_on_the_head_keeps_layout_and_revision_then_fans_out(mesh, hub, head_python):
    bed = mesh
    control_image(bed, VLLM_IMAGE)
    hub.clear()
    result = run(bed, "qwen3-1.7b-vllm", "-H", ALL, *THREE_REPLICAS, "--download-on", "head", env=online(hub))
    assert result.returncode == 0, result.stderr
    assert f"Downloading {MODEL} on {H1}" in result.stderr
    assert not (bed.home / "hf/hub/models--Qwen--Qwen3-1.7B").exists()  # nothing was downloaded here
    head = host_repo(bed.bed.hosts[0], MODEL)
    revision = (head / "refs" / "main").read_text()
    assert revision == hub.commit(MODEL)
    links = list((head / "snapshots" / revision).iterdir())
    assert links and all(p.is_symlink() and os.readlink(p).startswith("../../blobs/") for p in links)
    assert sum(sent_by(bed, CONTROL).values()) < 1.05 * (1 << 20) + 200_000  # the image only
    for host in bed.bed.hosts[1:]:
        assert cache_entry(host_repo(host, MODEL)) == cache_entry(head)
    bed("stop", "--all", "-H", ALL, check=0)


def test_a_snapshot_holding_only_config_json_is_not_a_cached_model(bed, hub):
    control_image(bed, VLLM_IMAGE)
    seed_local_model(bed, hub.url, pattern="config.json")  # what `show` and `recipe vram` fetch
    snapshots = bed.home / "hf/hub/models--Qwen--Qwen3-1.7B/snapshots"
    assert [p.name for p in snapshots.rglob("*") if p.is_file() or p.is_symlink()] == ["config.json"]
    offline = run(bed, "qwen3-1.7b-vllm", "-H", H1, env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "is not in the local Hugging Face cache" in offline.stderr
    result = run(bed, "qwen3-1.7b-vllm", "-H", H1, env=online(hub))
    assert result.returncode == 0, result.stderr
    assert list(host_repo(bed.bed.hosts[0], MODEL).rglob("*.safetensors"))
    bed("stop", "--all", "-H", H1, check=0)


def test_draft_model_and_tokenizer_repos_are_distributed_too(bed, hub):
    control_image(bed, VLLM_IMAGE)
    recipe = bed.home / "spec.yaml"
    spec = json.dumps({"model": DRAFT, "num_speculative_tokens": 3})
    recipe.write_text(json.dumps({
        "model": MODEL, "runtime": "vllm", "container": VLLM_IMAGE,
        "command": f"vllm serve {{model}} --speculative-config '{spec}' --tokenizer {TOKENIZER} --host {{host}} --port {{port}}"}))
    result = run(bed, recipe, "-H", f"{H1},{H2}", "--tp", "2", env=online(hub))
    assert result.returncode == 0, result.stderr
    assert f"Model {DRAFT} (draft model)" in result.stderr and f"Model {TOKENIZER} (tokenizer)" in result.stderr
    for host in bed.bed.hosts[:2]:
        assert list(host_repo(host, DRAFT).rglob("*.safetensors"))
        assert list(host_repo(host, TOKENIZER).rglob("tokenizer.json"))
        assert not list(host_repo(host, TOKENIZER).rglob("*.safetensors"))  # a tokenizer repo: tokenizer files only
        assert host.containers()[0]["env"]["HF_HUB_OFFLINE"] == "1"
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_multimodal_projector_is_synced_and_named(bed, hub):
    control_image(bed, LLAMA_IMAGE)
    recipe = llama_recipe(bed, "vision", f"{MMPROJ_GGUF}:Q8_0")
    result = run(bed, recipe, "-H", H1, env=online(hub))
    assert result.returncode == 0, result.stderr
    synced = sorted(p.name for p in host_repo(bed.bed.hosts[0], MMPROJ_GGUF).rglob("*.gguf"))
    assert synced == ["Vision-Q8_0.gguf", "mmproj-Vision-F16.gguf"]
    command = bed.bed.hosts[0].containers()[0]["command"][-1]
    assert "--mmproj /root/.cache/huggingface/hub/models--org--Vision-GGUF/snapshots/" in command
    bed("stop", "--all", "-H", H1, check=0)


def test_a_draft_gguf_repo_is_synced_and_llama_server_loads_it_from_the_cache(bed, hub):
    control_image(bed, LLAMA_IMAGE)
    recipe = llama_recipe(bed, "spec", f"{MAIN_GGUF}:Q8_0", f"-hfd {DRAFT_GGUF}:Q4_0 ")
    before = bed("run", recipe, "-H", H1, "--dry-run")
    assert f"-hfd {DRAFT_GGUF}:Q4_0" in before.stdout  # not in the local cache yet: nothing to point at
    result = run(bed, recipe, "-H", H1, env=online(hub))
    assert result.returncode == 0, result.stderr
    assert f"Model {DRAFT_GGUF} (draft model)" in result.stderr
    revision = hub.commit(DRAFT_GGUF)
    host = bed.bed.hosts[0]
    assert sorted(p.name for p in host_repo(host, DRAFT_GGUF).rglob("*.gguf")) == ["Draft-Q4_0.gguf"]
    assert sorted(p.name for p in host_repo(host, MAIN_GGUF).rglob("*.gguf")) == ["Main-Q8_0.gguf"]
    command = host.containers()[0]["command"][-1]
    assert "-hf " not in command and "-hfd " not in command
    assert f"-m /root/.cache/huggingface/hub/models--org--Main-GGUF/snapshots/{hub.commit(MAIN_GGUF)}/Main-Q8_0.gguf" in command
    assert f"-md /root/.cache/huggingface/hub/models--org--Draft-GGUF/snapshots/{revision}/Draft-Q4_0.gguf" in command
    assert host.containers()[0]["running"]  # llama-server loaded the draft from the synced file
    bed("stop", "--all", "-H", H1, check=0)
    after = bed("run", recipe, "-H", H1, "--dry-run")
    assert f"-md /root/.cache/huggingface/hub/models--org--Draft-GGUF/snapshots/{revision}/Draft-Q4_0.gguf" in after.stdout
    assert "-hfd" not in after.stdout


def test_a_draft_named_without_a_quant_takes_llama_servers_default_on_every_host(bed, hub):
    control_image(bed, LLAMA_IMAGE)
    recipe = llama_recipe(bed, "spec-rpc", f"{MAIN_GGUF}:Q8_0", f"--hf-repo-draft={MMPROJ_GGUF} ", tensor_parallel=2)
    result = run(bed, recipe, "-H", f"{H1},{H2}", env=online(hub))
    assert result.returncode == 0, result.stderr
    shards = ["Vision-Q4_K_M-00001-of-00002.gguf", "Vision-Q4_K_M-00002-of-00002.gguf"]
    for host in bed.bed.hosts[:2]:  # Q4_K_M before Q8_0, and no projector for a draft
        assert sorted(p.name for p in host_repo(host, MMPROJ_GGUF).rglob("*.gguf")) == shards
    command = bed.bed.hosts[0].containers()[-1]["command"][-1]
    assert "--hf-repo-draft" not in command and "--mmproj" not in command
    assert (f"-md /root/.cache/huggingface/hub/models--org--Vision-GGUF/snapshots/{hub.commit(MMPROJ_GGUF)}/"
            f"Q4_K_M/{shards[0]}") in command
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_a_gguf_model_named_without_a_quant_syncs_only_the_file_llama_server_would_load(bed, hub):
    """`model: org/x-GGUF` on llama.cpp: llama-server's -hf takes the repo's Q4_K_M file (else Q8_0,
    else the first), so only that file (and the projector -hf fetches) is copied, not every quant."""
    control_image(bed, LLAMA_IMAGE)
    recipe = llama_recipe(bed, "noquant", MMPROJ_GGUF)
    result = run(bed, recipe, "-H", H1, env=online(hub))
    assert result.returncode == 0, result.stderr
    shards = ["Vision-Q4_K_M-00001-of-00002.gguf", "Vision-Q4_K_M-00002-of-00002.gguf"]
    host = bed.bed.hosts[0]
    assert sorted(p.name for p in host_repo(host, MMPROJ_GGUF).rglob("*.gguf")) == shards + ["mmproj-Vision-F16.gguf"]
    command = host.containers()[0]["command"][-1]
    snapshot = f"/root/.cache/huggingface/hub/models--org--Vision-GGUF/snapshots/{hub.commit(MMPROJ_GGUF)}"
    assert f"-m {snapshot}/Q4_K_M/{shards[0]} --mmproj {snapshot}/mmproj-Vision-F16.gguf" in command
    assert "-hf " not in command
    bed("stop", "--all", "-H", H1, check=0)


def test_a_target_without_room_is_an_error_with_the_sizes(bed, hub):
    seed_local_model(bed, hub.url)
    control_image(bed, VLLM_IMAGE)
    bed.bed.hosts[1].fault("disk_free", 1 << 20)
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2")
    assert result.returncode == 1
    needed = model_size(bed)
    assert result.stderr.strip().splitlines()[-1] == "Error: " + f"{H2}: " + sparkrun.disk_full_message(
        needed, 1 << 20, ".cache/huggingface")
    assert not host_repo(bed.bed.hosts[0], MODEL).exists()  # nothing copied anywhere


def test_a_root_owned_cache_names_fix_permissions(bed, hub):
    seed_local_model(bed, hub.url)
    control_image(bed, VLLM_IMAGE)
    owned = host_repo(bed.bed.hosts[0], MODEL) / "blobs"
    owned.mkdir(parents=True)
    os.chown(owned, 65534, 65534)  # as a container (another user than the ssh user) left it
    result = run(bed, "qwen3-1.7b-vllm", "-H", H1)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {H1}: the Hugging Face cache holds files this user does not own")
    assert last.endswith(f"run: sparkrun setup fix-permissions -H {H1}")


# -- images ---------------------------------------------------------------------------

def test_a_multi_arch_image_is_never_loaded_in_the_wrong_architecture(mesh):
    bed = mesh
    control = Store(bed.control_state)
    for arch in ("amd64", "arm64"):  # what the registry serves for the tag
        install_image(control, VLLM_IMAGE, 1 << 20, registry=True, arch=arch)
    install_image(control, VLLM_IMAGE, 1 << 20, arch="amd64")  # an x86 laptop's `docker pull` got this
    bed.bed.hosts[0].add_registry_image(VLLM_IMAGE, size_bytes=1 << 20)  # the head can pull for itself
    # What must not happen: an amd64 image on a Spark fails at its first exec.
    spark = bed.bed.hosts[2]
    install_image(spark.store, "lab/amd64-only:1", 1024, arch="amd64")
    tried = spark.ssh("docker run --name tried lab/amd64-only:1 bash -c true; echo exit=$?")
    assert "exec bash: exec format error" in tried.stdout + tried.stderr and "exit=1" in tried.stdout
    assert "does not match the detected host platform (linux/arm64/v8)" in tried.stderr
    spark.ssh("docker rm -f tried; docker rmi lab/amd64-only:1")
    result = run(bed, "qwen3-1.7b-vllm", "-H", ALL, *THREE_REPLICAS, "--no-sync")
    assert result.returncode == 0, result.stderr
    assert f"Image {VLLM_IMAGE}: pulled on {H1}" in result.stderr
    for host in bed.bed.hosts:
        assert [i["arch"] for i in host.images() if f"{VLLM_IMAGE}" in i["tags"]] == ["arm64"]
    assert sum(sent_by(bed, CONTROL).values()) < 300_000  # the amd64 copy never left this machine
    assert all(t["from"].startswith("127.10.1") for t in between_hosts(bed))
    bed("stop", "--all", "-H", ALL, check=0)


def test_pulled_here_for_the_hosts_platform_when_no_host_can_pull(bed):
    control = Store(bed.control_state)
    for arch in ("amd64", "arm64"):
        install_image(control, VLLM_IMAGE, 1 << 20, registry=True, arch=arch)
    result = run(bed, "qwen3-1.7b-vllm", "-H", H1, "--no-sync")
    assert result.returncode == 0, result.stderr
    assert f"Image {VLLM_IMAGE}: pulled here for linux/arm64" in result.stderr
    assert [i["arch"] for i in bed.bed.hosts[0].images()] == ["arm64"]
    bed("stop", "--all", "-H", H1, check=0)


def test_an_image_on_the_containerd_store_is_recognised(bed):
    control_image(bed, VLLM_IMAGE)
    bed.bed.hosts[1].use_containerd_store()
    first = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync")
    assert first.returncode == 0, first.stderr
    shown = bed.bed.hosts[1].ssh(f"docker image inspect --format '{{{{.Id}}}}' {VLLM_IMAGE}").stdout.strip()
    assert shown != bed.bed.hosts[0].images()[0]["id"]  # two stores, two IDs for one image
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)
    for host in bed.bed.hosts:
        host.clear_docker_calls()
    again = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync")
    assert again.returncode == 0, again.stderr
    assert "Image" not in again.stderr
    assert not any(c[:1] == ["load"] for h in bed.bed.hosts for c in h.docker_calls())
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


NIGHTLY = "ghcr.io/spark-arena/dgx-vllm-eugr-nightly:latest"  # the default registry's recipes name it


def pulls(bed):
    """Every `docker pull` on the simulated hosts, by host."""
    return {h.addr: [c for c in h.docker_calls() if c[:1] == ["pull"]] for h in bed.bed.hosts}


def two_hosts_on_an_old_nightly(bed, rebuilt=True):
    """Both hosts and this machine hold build A of NIGHTLY; the head's registry holds build B
    (a rebuild), or nothing (offline). Returns (A, B)."""
    old = bed.bed.add_image(NIGHTLY, size_bytes=1 << 20, hosts=[1, 2])
    control_image(bed, NIGHTLY)
    new = bed.bed.hosts[0].add_registry_image(NIGHTLY, size_bytes=(1 << 20) + 4096) if rebuilt else None
    for host in bed.bed.hosts:
        host.clear_docker_calls()
    bed.bed.meter.reset()
    return old, new


def launch_ids(bed):
    return {h.addr: {c["image_id"] for c in h.containers()} for h in bed.bed.hosts[:2]}


def test_pull_gives_every_host_the_heads_fresh_build_copied_host_to_host(mesh):
    bed = mesh
    old, new = two_hosts_on_an_old_nightly(bed)
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--image", NIGHTLY, "--pull")
    assert result.returncode == 0, result.stderr
    assert f"Image {NIGHTLY}: pulled on {H1} in " in result.stderr
    assert f"{sparkrun.PULL_NOTE.format(image=NIGHTLY, head=H1)}" in result.stderr
    assert f"Image {NIGHTLY}: copying from {H1} to {H2}" in result.stderr
    assert launch_ids(bed) == {H1: {new}, H2: {new}} and old != new
    assert pulls(bed) == {H1: [["pull", "--quiet", NIGHTLY]], H2: [], H3: []}
    assert sum(sent_by(bed, CONTROL).values()) < 300_000  # this machine's old build never left it
    copies = [t for t in between_hosts(bed) if t["sent"] > 1 << 20]
    assert len(copies) == 1 and copies[0]["from"] in bed.bed.hosts[0].addresses()
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)
    for host in bed.bed.hosts:
        host.clear_docker_calls()
    again = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--image", NIGHTLY, "--pull")
    assert again.returncode == 0, again.stderr
    assert "copying" not in again.stderr  # both hold the head's build: nothing moves
    assert not any(c[:1] == ["load"] for h in bed.bed.hosts for c in h.docker_calls())
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_a_failed_pull_warns_once_and_launches_on_the_copies_present(bed):
    old, _ = two_hosts_on_an_old_nightly(bed, rebuilt=False)
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--image", NIGHTLY, "--pull")
    assert result.returncode == 0, result.stderr
    why = 'Error response from daemon: Get "https://ghcr.io/v2/": dial tcp: lookup ghcr.io: no such host'
    assert [line for line in result.stderr.splitlines() if "could not pull" in line] == [
        f"Warning: {sparkrun.PULL_FAILED.format(head=H1, image=NIGHTLY, why=why)}"]
    assert launch_ids(bed) == {H1: {old}, H2: {old}}
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_a_moving_tag_without_pull_is_noted_and_never_pulled(bed):
    old, _ = two_hosts_on_an_old_nightly(bed)
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--image", NIGHTLY)
    assert result.returncode == 0, result.stderr
    created = bed.bed.hosts[0].ssh(f"docker image inspect --format '{{{{.Created}}}}' {NIGHTLY}").stdout.strip()
    copy = f"the copy on {H1} ({old[7:19]}, created {created[:10]} {created[11:16]} UTC)"
    notes = [line for line in result.stderr.splitlines() if "moving tag" in line]
    assert notes == [f"{sparkrun.MOVING_TAG_NOTE.format(image=NIGHTLY, copy=copy)}"]
    assert launch_ids(bed) == {H1: {old}, H2: {old}}
    assert pulls(bed) == {H1: [], H2: [], H3: []}
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_a_pinned_tag_is_never_pulled(bed):
    pinned = "ghcr.io/lab/vllm:v1"
    old = bed.bed.add_image(pinned, size_bytes=1 << 20, hosts=[1, 2])
    bed.bed.hosts[0].add_registry_image(pinned, size_bytes=(1 << 20) + 4096)  # re-pushed under the same tag
    result = run(bed, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--image", pinned, "--pull")
    assert result.returncode == 0, result.stderr
    assert f"{sparkrun.PINNED_NOTE.format(image=pinned)}" in result.stderr
    assert "moving tag" not in result.stderr
    assert launch_ids(bed) == {H1: {old}, H2: {old}}
    assert pulls(bed) == {H1: [], H2: [], H3: []}
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_which_tags_move():
    moving = ["vllm/vllm-openai", "vllm/vllm-openai:latest", "ghcr.io/spark-arena/dgx-vllm-eugr-nightly:latest",
              "lab/vllm:nightly-2026-11-20", "localhost:5000/vllm"]
    pinned = ["vllm/vllm-openai:v0.11.0", "localhost:5000/vllm:v1", "lab/vllm-nightly:v1", "vllm-node",
              "vllm/vllm-openai@sha256:" + "a" * 64]
    assert [i for i in moving if not sparkrun.moving_tag(i)] == [] and [i for i in pinned if sparkrun.moving_tag(i)] == []


# -- eugr's locally built images ------------------------------------------------------

EUGR_RECIPE = """recipe_version: "1"
model: Qwen/Qwen3-1.7B
container: vllm-node-tf5
build_args:
  - --tf5
command: vllm serve Qwen/Qwen3-1.7B --host 0.0.0.0 --port 8000
"""
BASE_IMAGE = "nvcr.io/nvidia/pytorch:26.01-py3"
# A stand-in for eugr's build-and-copy.sh: `-t TAG` names the image it builds FROM the NGC PyTorch
# base, the other arguments are build options (eugr/spark-vllm-docker's README).
BUILD_SCRIPT = """#!/bin/bash
set -e
echo "$@" > "$HOME/build-args"
while [ $# -gt 0 ]; do case $1 in -t) tag=$2; shift 2;; *) shift;; esac; done
docker pull {base} >/dev/null
docker tag {base} "$tag"
"""


def test_eugr_image_nowhere_names_both_ways(bed):
    recipe = bed.home / "eugr.yaml"
    recipe.write_text(EUGR_RECIPE)
    result = run(bed, recipe, "-H", H1, "--no-sync")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: image vllm-node-tf5 is built by eugr's build-and-copy.sh and exists on no host")
    assert "sparkrun registry add https://github.com/eugr/spark-vllm-docker.git" in last
    assert f"under 'aliases:' in {bed.home / 'config' / 'images.yaml'}" in last


def test_eugr_image_from_an_alias_in_the_configuration(bed):
    recipe = bed.home / "eugr.yaml"
    recipe.write_text(EUGR_RECIPE)
    (bed.home / "config").mkdir(exist_ok=True)
    (bed.home / "config" / "images.yaml").write_text("aliases:\n  vllm-node-tf5: ghcr.io/lab/vllm-node:tf5\n")
    bed.bed.hosts[0].add_registry_image("ghcr.io/lab/vllm-node:tf5", size_bytes=1 << 20)
    result = run(bed, recipe, "-H", f"{H1},{H2}", "--no-sync", "--tp", "2")
    assert result.returncode == 0, result.stderr
    for host in bed.bed.hosts[:2]:
        assert any("vllm-node-tf5:latest" in i["tags"] for i in host.images())
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


def test_eugr_image_built_on_the_head_with_the_recipe_build_args(bed):
    repo = bed.home / "spark-vllm-docker"
    (repo / "recipes").mkdir(parents=True)
    (repo / "recipes" / "tf5.yaml").write_text(EUGR_RECIPE)
    (repo / "build-and-copy.sh").write_text(BUILD_SCRIPT.format(base=BASE_IMAGE))
    for argv in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True)
    assert bed("registry", "add", str(repo), "--name", "eugr", "--path", "recipes").returncode == 0
    bed.bed.hosts[0].add_registry_image(BASE_IMAGE, size_bytes=1 << 20)
    result = run(bed, "@eugr/tf5", "-H", f"{H1},{H2}", "--no-sync", "--tp", "2")
    assert result.returncode == 0, result.stderr
    assert "building it on" in result.stderr
    assert (bed.bed.hosts[0].home / "build-args").read_text().split() == ["-t", "vllm-node-tf5", "--tf5"]
    assert any("vllm-node-tf5:latest" in i["tags"] for i in bed.bed.hosts[1].images())
    bed("stop", "--all", "-H", f"{H1},{H2}", check=0)


# -- the pure parts -------------------------------------------------------------------

def ib_facts(host, *addresses):
    ib = tuple(sparkrun.IbDevice(f"roce{i}", "4: ACTIVE", f"enp{i}", a, 3) for i, a in enumerate(addresses))
    return sparkrun.HostFacts(host, ib=ib, addresses=tuple((f"enp{i}", a) for i, a in enumerate(addresses)))


def test_copies_this_machine_sends_once_then_holders_share_out_over_the_fabric():
    facts = {h: ib_facts(h, f"10.0.0.{n}/24") for n, h in enumerate(["a", "b", "c", "d"], 1)}
    rounds = sparkrun.plan_copies(["a", "b", "c", "d"], [], facts)
    assert [[(c.source, c.target, c.address, c.bind) for c in r] for r in rounds] == [
        [("", "a", "a", "")],
        [("a", "b", "10.0.0.2", "10.0.0.1"), ("a", "c", "10.0.0.3", "10.0.0.1"), ("a", "d", "10.0.0.4", "10.0.0.1")]]
    shared = sparkrun.plan_copies(["c", "d"], ["a", "b"], facts)
    assert [(c.source, c.target) for c in shared[0]] == [("a", "c"), ("b", "d")] and len(shared) == 1
    # No CX7 subnet in common: the name the host was given, no binding.
    apart = {"a": ib_facts("a", "10.0.0.1/24"), "b": ib_facts("b", "10.9.0.2/24")}
    assert sparkrun.fabric_route(apart["a"], apart["b"], "user@b") == ("b", "")


def test_image_identity_survives_image_stores_but_not_architectures():
    overlay = sparkrun.parse_image_info('sha256:c0nf|arm64|[]|["sha256:l1","sha256:l2"]')
    containerd = sparkrun.parse_image_info('sha256:man1fest|arm64|["r@sha256:1dx"]|["sha256:l1","sha256:l2"]')
    other_arch = sparkrun.parse_image_info('sha256:x86|amd64|["r@sha256:1dx"]|["sha256:l9"]')
    assert sparkrun.same_image(overlay, containerd)
    assert not sparkrun.same_image(containerd, other_arch)  # one index digest, two platforms
    assert sparkrun.parse_image_info("sha256:1234").as_dict() == {"id": "sha256:1234", "arch": "", "digests": (), "layers": (),
                                                                     "created": "", "entrypoint": ()}
    assert sparkrun.parse_image_info("") is None


def test_repos_a_command_needs_besides_the_model(tmp_path):
    recipe = sparkrun.recipe_from_mapping({"model": "org/main", "runtime": "vllm", "container": "i",
                                           "command": "vllm serve {model}"}, tmp_path / "r.yaml", "Local", "")
    command = ("vllm serve org/main --speculative-config '{\"model\": \"org/draft\", \"num_speculative_tokens\": 3}' "
               "--tokenizer=org/tok --speculative-model /models/local-draft")
    assert [(n.repo, n.role) for n in sparkrun.repo_needs(recipe, command)] == [
        ("org/main", "model"), ("org/draft", "draft model"), ("org/tok", "tokenizer")]
    recipe.declared_runtime = "sglang"
    command = "sglang serve --model-path org/main --speculative-draft-model-path org/eagle --tokenizer-path org/main"
    assert [n.repo for n in sparkrun.repo_needs(recipe, command)] == ["org/main", "org/eagle"]


def test_a_llama_server_draft_repo_is_a_gguf_need_with_its_quant(tmp_path):
    recipe = sparkrun.recipe_from_mapping({"model": "org/main-GGUF:Q8_0", "runtime": "llama-cpp", "container": "i",
                                           "command": "llama-server -hf {model}"}, tmp_path / "r.yaml", "Local", "")
    for flag in ("-hfd ", "-hfrd ", "--hf-repo-draft=", "--spec-draft-hf "):
        needs = sparkrun.repo_needs(recipe, f"llama-server -hf org/main-GGUF:Q8_0 {flag}org/draft-GGUF:Q4_0")
        assert [(n.repo, n.role, n.gguf_quant, n.written) for n in needs] == [
            ("org/main-GGUF", "model", "Q8_0", "org/main-GGUF:Q8_0"),
            ("org/draft-GGUF", "draft model", "Q4_0", "org/draft-GGUF:Q4_0")]
    unquantized = sparkrun.repo_needs(recipe, "llama-server -hf org/main-GGUF:Q8_0 -hfd org/draft-GGUF")[1]
    assert (unquantized.gguf_quant, unquantized.gguf_defaults) == (None, ("Q4_K_M", "Q8_0"))
    assert "*Q4_K_M*.gguf" in unquantized.download_patterns() and "*Q8_0*.gguf" in unquantized.download_patterns()
    assert not any("mmproj" in p for p in unquantized.download_patterns())  # a draft's projector is never loaded
    assert sparkrun.repo_needs(recipe, "llama-server -hf org/main-GGUF:Q8_0 -md /models/draft.gguf")[1:] == []


def test_the_gguf_file_of_a_repo_is_picked_as_llama_server_picks_it():
    """common/download.cpp, find_best_model: the named quant, else Q4_K_M, else Q8_0, else the
    first model file (its first shard); never a projector."""
    draft = sparkrun.RepoNeed("org/d", "draft model", gguf_defaults=("Q4_K_M", "Q8_0"))
    files = {"d-Q8_0.gguf": 1, "Q4_K_M/d-Q4_K_M-00001-of-00002.gguf": 2, "Q4_K_M/d-Q4_K_M-00002-of-00002.gguf": 2,
             "mmproj-d-F16.gguf": 3, "README.md": 4}
    assert sparkrun.SnapshotCopy("r", files).usable(draft) == {
        "Q4_K_M/d-Q4_K_M-00001-of-00002.gguf": 2, "Q4_K_M/d-Q4_K_M-00002-of-00002.gguf": 2}
    assert sparkrun.SnapshotCopy("r", {"d-Q8_0.gguf": 1, "d-F16.gguf": 5}).usable(draft) == {"d-Q8_0.gguf": 1}
    others = {"d-IQ4_XS-00002-of-00002.gguf": 6, "d-IQ4_XS-00001-of-00002.gguf": 6, "d-Q6_K.gguf": 7, "mmproj-d.gguf": 3}
    assert sparkrun.SnapshotCopy("r", others).usable(draft) == {
        "d-IQ4_XS-00001-of-00002.gguf": 6, "d-IQ4_XS-00002-of-00002.gguf": 6}
    quantized = draft.replace(gguf_quant="Q6_K", gguf_defaults=())
    assert sparkrun.SnapshotCopy("r", others).usable(quantized) == {"d-Q6_K.gguf": 7}
    assert sparkrun.SnapshotCopy("r", {"d-Q8_0.gguf": 1}).usable(quantized) is None  # a named quant has no fallback
    snapshot = sparkrun.make_snapshot(draft, sparkrun.SnapshotCopy("r", files), Path("/hf"))
    assert (snapshot.gguf_file, snapshot.mmproj_file) == ("Q4_K_M/d-Q4_K_M-00001-of-00002.gguf", None)


def test_llama_server_is_pointed_at_the_synced_model_and_draft_files(tmp_path):
    recipe = sparkrun.recipe_from_mapping({
        "model": "org/main-GGUF:Q8_0", "runtime": "llama-cpp", "container": "i",
        "command": "llama-server -hf {model} --hf-repo-draft org/draft-GGUF:Q4_0 --alias m --port {port}"},
        tmp_path / "r.yaml", "Local", "")
    main = sparkrun.RepoNeed("org/main-GGUF", gguf_quant="Q8_0")
    draft = sparkrun.RepoNeed("org/draft-GGUF", "draft model", gguf_quant="Q4_0")
    snapshots = [sparkrun.make_snapshot(need, sparkrun.SnapshotCopy("c0ffee", files), Path("/hf")) for need, files in (
        (main, {"main-Q8_0.gguf": 9, "mmproj-main-F16.gguf": 2}), (draft, {"draft-Q4_0.gguf": 1}))]
    selection, options = sparkrun.HostSelection(("h1",), None, "t"), sparkrun.LaunchOptions(overrides={})
    command = sparkrun.plan_launch(recipe, selection, options, snapshots=snapshots).containers[0].command
    hub = "/root/.cache/huggingface/hub"
    assert command == (f"llama-server -m {hub}/models--org--main-GGUF/snapshots/c0ffee/main-Q8_0.gguf "
                       f"--mmproj {hub}/models--org--main-GGUF/snapshots/c0ffee/mmproj-main-F16.gguf "
                       f"-md {hub}/models--org--draft-GGUF/snapshots/c0ffee/draft-Q4_0.gguf --alias m --port 8000 --metrics")
    only_model = sparkrun.plan_launch(recipe, selection, options, snapshots=[snapshots[0], None]).containers[0].command
    assert "-m /root/" in only_model and "--hf-repo-draft org/draft-GGUF:Q4_0" in only_model


def test_what_makes_a_usable_snapshot():
    model = sparkrun.RepoNeed("org/m")
    weights = {"config.json": 10, "model-1.safetensors": 5, "model-2.safetensors": 5}
    assert sparkrun.SnapshotCopy("r", {"config.json": 10}).usable(model) is None
    assert sparkrun.SnapshotCopy("r", weights, frozenset(["model-1.safetensors"])).usable(model) == weights
    assert sparkrun.SnapshotCopy("r", {"config.json": 10, "model-1.safetensors": 5},
                                 frozenset(["model-1.safetensors", "model-2.safetensors"])).usable(model) is None
    gguf = sparkrun.RepoNeed("org/g", gguf_quant="Q4_K")
    files = {"m-Q4_K.gguf": 1, "m-Q4_K_M.gguf": 2, "mmproj-F16.gguf": 3, "README.md": 4}
    assert sparkrun.SnapshotCopy("r", files).usable(gguf) == {"m-Q4_K.gguf": 1, "mmproj-F16.gguf": 3}
    assert sparkrun.SnapshotCopy("r", {"mmproj-F16.gguf": 3}).usable(gguf) is None
    tokenizer = sparkrun.RepoNeed("org/t", "tokenizer")
    assert sparkrun.SnapshotCopy("r", {"tokenizer.json": 1}).usable(tokenizer) == {"tokenizer.json": 1}


def test_eugr_image_from_an_alias_in_a_registry_manifest(bed):
    repo = bed.home / "lab-registry"
    (repo / ".sparkrun").mkdir(parents=True)
    (repo / "recipes").mkdir()
    (repo / "recipes" / "tf5.yaml").write_text(EUGR_RECIPE)
    (repo / ".sparkrun" / "registry.yaml").write_text(
        "registries:\n  - name: lab\n    recipes: recipes\nimage_aliases:\n  vllm-node-tf5: ghcr.io/lab/vllm-node:tf5\n")
    for argv in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True)
    assert bed("registry", "add", str(repo)).returncode == 0
    bed.bed.hosts[0].add_registry_image("ghcr.io/lab/vllm-node:tf5", size_bytes=1 << 20)
    result = run(bed, "@lab/tf5", "-H", H1, "--no-sync")
    assert result.returncode == 0, result.stderr
    assert f"Image vllm-node-tf5: pulling its alias ghcr.io/lab/vllm-node:tf5 on {H1}" in result.stderr
    bed("stop", "--all", "-H", H1, check=0)
