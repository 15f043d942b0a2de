"""Unified memory and start-up time: the page cache, the free-memory preflight, the allocator and
limits, and the engines' persistent compile caches (plan, probe parsing, end to end on the bed)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS, H1, H2
from test_lifecycle import popen, wait_for_line

import sparkrun

VLLM_IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
SGLANG_IMAGE = "scitrera/dgx-spark-sglang:0.5.9-t5"
MODEL_DIR = "models--Qwen--Qwen3-1.7B"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def plan_for(name: str, overrides: dict | None = None, environ=None):
    recipe = sparkrun.find_recipe(name)
    selection = sparkrun.HostSelection((H1, H2), None, "-H")
    return sparkrun.plan_launch(recipe, selection, sparkrun.LaunchOptions(overrides=overrides or {}),
                                environ=environ or {})


def test_vllm_and_sglang_get_the_allocator_setting_and_their_compile_caches():
    for name, engine, own in (("qwen3-1.7b-vllm", "vllm", "VLLM_CACHE_ROOT"),
                              ("qwen3-1.7b-sglang", "sglang", "SGLANG_DG_CACHE_DIR")):
        spec = plan_for(name).head_container
        env = dict(spec.env)
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        cache = sparkrun.CONTAINER_COMPILE_CACHE
        for variable in (own, "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[variable].startswith(cache + "/")
        assert (f"~/.cache/sparkrun/compile/{engine}", cache) in spec.mounts
        argv = spec.docker_run_argv()
        assert argv[argv.index("--ipc") + 1] == "host" and "--shm-size" not in argv
        assert "stack=67108864" in argv and argv[argv.index("stack=67108864") - 1] == "--ulimit"


def test_a_recipes_own_env_wins_and_llama_cpp_gets_none_of_it(tmp_path):
    recipe = tmp_path / "own.yaml"
    recipe.write_text("model: Qwen/Qwen3-1.7B\ncontainer: img\ncommand: vllm serve Qwen/Qwen3-1.7B\n"
                      "env:\n  PYTORCH_CUDA_ALLOC_CONF: max_split_size_mb:512\n  TRITON_CACHE_DIR: /mine\n")
    env = plan_for(str(recipe)).head_container.env
    assert [v for k, v in env if k == "PYTORCH_CUDA_ALLOC_CONF"] == ["max_split_size_mb:512"]
    assert [v for k, v in env if k == "TRITON_CACHE_DIR"] == ["/mine"]
    llama = plan_for("qwen3-1.7b-llama-cpp").head_container
    assert "PYTORCH_CUDA_ALLOC_CONF" not in dict(llama.env)
    assert not any("compile" in m[0] for m in llama.mounts)


def test_the_corpus_recipes_that_set_the_allocator_keep_their_value():
    paths = [p for p in CORPUS.rglob("*.yaml") if "PYTORCH_CUDA_ALLOC_CONF" in p.read_text()]
    if not paths:
        pytest.skip(f"no corpus at {CORPUS}")
    for path in paths:
        recipe = sparkrun.load_recipe(path)
        added = dict(sparkrun.runtime_env_defaults(sparkrun.load_runtime(recipe.runtime), recipe.env))
        own, _ = sparkrun.expand_env(recipe, {})
        assert "PYTORCH_CUDA_ALLOC_CONF" not in added and "VLLM_CACHE_ROOT" in added, path
        assert dict(own)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True", path


# Raw output as the tools print it on a DGX Spark (nvidia-smi 580: "[N/A]" GPU total, per-process
# memory; docker ps JSON lines of every container; /proc/meminfo figures from the probe's own loop).
SPARK_PROBE = "\n".join([
    "@@hostname", "spark-1",
    "@@gpu", "NVIDIA GB10, [N/A]",
    "@@gpu_processes", "114687, 19135", "2001, [N/A]",
    "@@docker",
    '{"Names":"other","State":"running","Image":"comfyui","Labels":""}',
    '{"Names":"old","State":"exited","Image":"x","Labels":""}',
    '{"Names":"sparkrun_ab_head","State":"running","Image":"v","Labels":"sparkrun.cluster=sparkrun_ab,'
    'sparkrun.recipe=r"}',
    "@@caches", "1048576\t/root/.cache/sparkrun/compile/vllm/",
    "@@memtotal", "127600748", "@@meminfo", "60000000", "@@shmem", "1048576",
    "@@end", ""])


def test_probe_reads_available_memory_gpu_processes_and_every_container():
    facts = sparkrun.parse_probe("h", SPARK_PROBE)
    assert (facts.mem_total_mib, facts.mem_available_mib) == (127600748 // 1024, 60000000 // 1024)
    assert facts.shmem_mib == 1024
    assert facts.gpu_total_bytes == 127600748 // 1024 * 2**20  # [N/A]: the host's memory
    assert facts.gpu_processes == ((114687, 19135.0),)  # no figure, nothing to count
    assert [c["Names"] for c in facts.containers] == ["sparkrun_ab_head"]
    assert [c["Names"] for c in facts.other_containers] == ["other"]
    assert facts.compile_caches == (("vllm", 1048576),)
    discrete = sparkrun.parse_probe("h", SPARK_PROBE.replace("[N/A]\n", "81920 MiB\n", 1))
    assert discrete.gpu_total_bytes == 81920 * 2**20


def test_memory_shortfall_names_the_holders():
    plan = plan_for("qwen3-1.7b-vllm")
    facts = {plan.head: sparkrun.parse_probe(plan.head, SPARK_PROBE)}
    estimate = sparkrun.recipe_vram(sparkrun.find_recipe("qwen3-1.7b-vllm"), {}, hf_home=Path("/nonexistent"),
                                    auto_detect=False)
    (line,) = sparkrun.memory_shortfalls(plan, facts, estimate, 0.9)
    assert line.startswith(f"{plan.head}: needs 109.5 GB (gpu_memory_utilization 0.9 of 121.7 GB) but 57.2 GB "
                           "is available, held by container sparkrun_ab_head (sparkrun: r), container other "
                           "(not sparkrun's, image comfyui), process 114687 (18.7 GB); ")
    assert sparkrun.memory_shortfalls(plan, facts, estimate, 0.4) == []
    assert sparkrun.memory_shortfalls(plan, facts, estimate, 0.9, skip={plan.head}) == []


# -- end to end on the bed ------------------------------------------------------------------------

def local_model(home: Path, files: dict) -> Path:
    """A complete Hugging Face cache entry for Qwen/Qwen3-1.7B on the control machine."""
    repo = home / "hf" / "hub" / MODEL_DIR
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for index, (name, size) in enumerate(files.items()):
        blob = repo / "blobs" / f"{index:040x}"
        blob.write_bytes(bytes([index + 1]) * size)
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    return snapshot


def resident_bytes(path: Path) -> int:
    """How much of a file sits in this machine's page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path.resolve())], capture_output=True, text=True)
    return int(out.stdout.strip())


def run(bed, *args, timeout=180):
    return bed("run", *map(str, args), "--no-follow", timeout=timeout)


@pytest.fixture
def lab(bed):
    for image in (VLLM_IMAGE, SGLANG_IMAGE):
        bed.bed.add_image(image, size_bytes=4096)
    return bed


def test_page_cache_is_dropped_on_every_host_before_the_containers(lab):
    h1, h2 = lab.bed.hosts[:2]
    local_model(lab.home, {"config.json": 100, "model.safetensors": 1 << 20})
    result = run(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "-v")
    assert result.returncode == 0, result.stderr
    for host in (h1, h2):
        assert (host.root / "drop_caches").read_text() == "3\n"  # stands in for /proc/sys/vm/drop_caches
    assert f"[{H1}] page cache: dropped (" in result.stderr and f"[{H2}] page cache: dropped (" in result.stderr
    assert result.stderr.index("page cache: dropped") < result.stderr.index("starting head")
    assert "s freeing the page cache)" in result.stderr
    assert lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}").returncode == 0
    for host in (h1, h2):
        (host.root / "drop_caches").unlink()
    skipped = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-drop-cache")
    assert skipped.returncode == 0, skipped.stderr
    assert not (h1.root / "drop_caches").exists()


@pytest.mark.skipif(not Path("/usr/bin/fincore").exists(), reason="needs fincore (util-linux)")
def test_without_a_way_to_drop_caches_the_models_files_are_evicted_else_one_warning(lab):
    h1 = lab.bed.hosts[0]
    h1.block_drop_caches()
    local_model(lab.home, {"config.json": 100, "model.safetensors": 4 << 20})
    result = run(lab, "qwen3-1.7b-vllm", "-H", H1, "-v")
    assert result.returncode == 0, result.stderr
    assert f"[{H1}] page cache: evicted 2 model files (" in result.stderr and "Warning" not in result.stderr
    remote = h1.home / ".cache" / "huggingface" / "hub" / MODEL_DIR / "snapshots" / REVISION
    assert (remote / "model.safetensors").resolve().stat().st_size == 4 << 20
    assert resident_bytes(remote / "model.safetensors") == 0  # rsync just wrote it: cached until evicted
    assert lab("stop", "qwen3-1.7b-vllm", "-H", H1).returncode == 0
    # Neither works: no root way, and the model's files are not where they should be (--no-sync).
    subprocess.run(["rm", "-rf", str(h1.home / ".cache" / "huggingface" / "hub")], check=True)
    warned = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow", timeout=180)
    assert warned.returncode == 0, warned.stderr
    warnings = [l for l in warned.stderr.splitlines() if l.startswith("Warning:")]
    assert warnings == ["Warning: " + sparkrun.PAGE_CACHE_UNFREED.format(hosts=H1)]


def foreign_vllm(host, fraction: float, port: int = 9100):
    """Someone's own vLLM container, started by hand (no sparkrun labels)."""
    started = host.ssh(f"docker run -d --name by-hand --network host --gpus all {VLLM_IMAGE} "
                       f"vllm serve other/model --port {port} --gpu-memory-utilization {fraction}")
    assert started.returncode == 0, started.stderr
    host.wait_http(port)


def test_preflight_warns_about_memory_held_by_a_foreign_container_and_strict_refuses(lab):
    h1 = lab.bed.hosts[0]
    foreign_vllm(h1, 0.8)  # 97.4 GB of the Spark's 121.7 GB: 19.0 GB left beside it
    holder = next(c for c in h1.containers() if c["name"] == "by-hand")
    refused = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow", "--strict", timeout=120)
    assert refused.returncode == 1
    assert (f"Error: {H1}: needs 36.5 GB (gpu_memory_utilization 0.3 of 121.7 GB) but 19.0 GB is available, "
            f"held by container by-hand (not sparkrun's, image {VLLM_IMAGE}), process {holder['pid']} (97.4 GB); "
            "stop what you do not need, or lower --gpu-mem") in refused.stderr
    assert "refusing to launch because of --strict" in refused.stderr
    assert [c["name"] for c in h1.containers()] == ["by-hand"]  # nothing started
    warned = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow", timeout=120)
    assert warned.returncode == 0, warned.stderr
    assert [l for l in warned.stderr.splitlines() if l.startswith("Warning:")] == [
        f"Warning: {H1}: needs 36.5 GB (gpu_memory_utilization 0.3 of 121.7 GB) but 19.0 GB is available, "
        f"held by container by-hand (not sparkrun's, image {VLLM_IMAGE}), process {holder['pid']} (97.4 GB); "
        "stop what you do not need, or lower --gpu-mem"]
    assert lab("stop", "qwen3-1.7b-vllm", "-H", H1).returncode == 0
    fits = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow", "--strict", "--gpu-mem", "0.1",
               timeout=120)
    assert fits.returncode == 0 and "Warning" not in fits.stderr, fits.stderr


def test_compile_cache_survives_the_container_and_status_and_clear_cache_see_it(lab):
    h1 = lab.bed.hosts[0]
    first = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync")
    assert first.returncode == 0, first.stderr
    (container,) = [c for c in h1.containers() if c["running"]]
    assert "Compiling a graph for compile range" in h1.container_log(container["name"])
    cache = h1.home / ".cache" / "sparkrun" / "compile" / "vllm"
    assert list((cache / "vllm" / "torch_compile_cache").rglob("computation_graph.py"))
    assert lab("stop", "qwen3-1.7b-vllm", "-H", H1).returncode == 0
    second = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync")
    assert second.returncode == 0, second.stderr
    (container,) = [c for c in h1.containers() if c["running"]]
    log = h1.container_log(container["name"])
    assert "Directly load the compiled graph(s) for compile range" in log and "Compiling a graph" not in log
    status = lab("status", "-H", H1, "--no-probe")
    assert f"{H1}: compile caches vllm " in status.stdout
    hosts = json.loads(lab("status", "-H", H1, "--json", "--no-probe").stdout)["hosts"]
    assert hosts[0]["compile_caches"]["vllm"] > 0
    assert lab("stop", "qwen3-1.7b-vllm", "-H", H1).returncode == 0
    cleared = lab("setup", "clear-cache", "-H", H1, "--compile-caches")
    assert cleared.returncode == 0, cleared.stderr
    assert f"{H1}: emptied the compile caches (" in cleared.stdout
    assert cache.parent.is_dir() and list(cache.parent.iterdir()) == []
    # A linked folder is not followed: what it points at stays.
    elsewhere = h1.home / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    cache.parent.rmdir()
    cache.parent.symlink_to(elsewhere)
    linked = lab("setup", "clear-cache", "-H", H1, "--compile-caches")
    assert linked.returncode == 0 and (elsewhere / "keep").is_dir()
    assert "Warning: " + lab_setup.COMPILE_CACHES_LINKED.format(host=H1) in linked.stderr
    cache.parent.unlink()
    third = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync")
    assert third.returncode == 0, third.stderr
    (container,) = [c for c in h1.containers() if c["running"]]
    assert "Compiling a graph for compile range" in h1.container_log(container["name"])


def test_without_the_mount_the_compile_cache_dies_with_the_container(lab):
    """The stand-in engine imitates a container's own layer: what is not mounted does not persist."""
    h1 = lab.bed.hosts[0]
    for _ in range(2):
        started = h1.ssh(f"docker run -d --name plain --network host {VLLM_IMAGE} vllm serve m --port 9200")
        assert started.returncode == 0, started.stderr
        h1.wait_http(9200)
        assert "Compiling a graph for compile range" in h1.container_log("plain")
        assert h1.ssh("docker rm -f plain").returncode == 0



SPARK_MEMTOTAL_KIB = 127600748  # a DGX Spark's MemTotal: the default floor, 5 %, is 6.1 GB


def test_the_memory_guard_stops_after_two_low_checks_in_a_row_and_can_be_lowered_or_turned_off():
    guard = sparkrun.MemoryGuard()
    guard.check("h", 5_000_000, SPARK_MEMTOTAL_KIB)
    guard.check("h", 60_000_000, SPARK_MEMTOTAL_KIB)  # one low check is a transient: counting starts again
    guard.check("h", 5_000_000, SPARK_MEMTOTAL_KIB)
    with pytest.raises(sparkrun.RemoteFailed) as stopped:
        guard.check("h", 2_000_000, SPARK_MEMTOTAL_KIB)
    assert str(stopped.value).startswith("h: available memory fell to 1.9 GB (floor 6.1 GB) while the engine was ")
    assert "lower --gpu-mem or --max-model-len" in str(stopped.value)
    lowered, off = sparkrun.MemoryGuard(floor_gb=1.5), sparkrun.MemoryGuard(floor_gb=0)
    for _ in range(3):
        lowered.check("h", 2_000_000, SPARK_MEMTOTAL_KIB)
        off.check("h", 0, SPARK_MEMTOTAL_KIB)
    with pytest.raises(sparkrun.RemoteFailed, match="fell to 1.0 GB .floor 1.5 GB."):
        for _ in range(2):
            lowered.check("h", 1 << 20, SPARK_MEMTOTAL_KIB)


def test_a_host_running_low_on_memory_while_the_engines_start_stops_the_launch_on_every_host(lab):
    h1, h2 = lab.bed.hosts[:2]
    h2.fault("engine_slow_ready", "300")  # the worker loads for a long time: the head waits for it
    launch = popen(lab, "run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--no-follow")
    try:
        wait_for_line(launch.stderr, "not ready yet")  # the first check has run
        (h2.root / "meminfo").write_text(f"MemTotal:       {SPARK_MEMTOTAL_KIB} kB\n"
                                         "MemAvailable:    2000000 kB\nShmem:             0 kB\n")
        low = time.monotonic()
        _, err = launch.communicate(timeout=120)
        elapsed = time.monotonic() - low
    finally:
        launch.kill()
    print(f"stopped {elapsed:.1f} s after the host's memory fell")
    assert launch.returncode == 1
    assert f"Error: {H2}: available memory fell to 1.9 GB (floor 6.1 GB) while the engine was starting" in err
    assert elapsed < 30  # two checks 5 s apart and the graceful stop, not the 3600 s ready timeout
    assert h1.containers() == h2.containers() == [] and segments(h1) == segments(h2) == []
    assert h1.processes_alive() == h2.processes_alive() == []


def test_with_enough_memory_or_the_guard_lowered_the_launch_proceeds(lab):
    h1, h2 = lab.bed.hosts[:2]
    h2.fault("engine_slow_ready", "7")  # two checks while the worker loads
    normal = run(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync")
    assert normal.returncode == 0 and normal.stderr.count("not ready yet") >= 2, normal.stderr
    assert lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}").returncode == 0
    h2.set_memory(available_kib=3_000_000)  # 2.9 GB: under the default floor at every check
    lowered = run(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--memory-floor", "2")
    assert lowered.returncode == 0 and lowered.stderr.count("not ready yet") >= 2, lowered.stderr
    assert lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}").returncode == 0
    refused = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--memory-floor", "-1", "--dry-run")
    assert refused.returncode == 2 and "--memory-floor takes GB of available memory" in refused.stderr


# The sudo side for real, with a throwaway local user (see test_setup): the rule `setup clear-cache
# --save-sudo` saves lets the page-cache step drop caches; without it, the model's files are evicted.

from test_setup import grant, local_user, needs_root_and_sudo  # noqa: E402,F401  (local_user: a fixture)

lab_setup = sparkrun.command_module("lab_setup")


def page_cache_as(user, root: Path, target: Path) -> str:
    snapshot = sparkrun.ModelSnapshot("Qwen/Qwen3-1.7B", REVISION, "main", root / "hub" / MODEL_DIR, ())
    done = subprocess.run(["runuser", "-u", user["name"], "--", "env", f"SPARKRUN_DROP_CACHES={target}",
                           "bash", "-c", sparkrun.page_cache_script([snapshot], str(root))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@needs_root_and_sudo
def test_page_cache_step_uses_the_saved_sudo_rule_else_evicts_as_the_user(local_user):
    user, name = local_user, local_user["name"]
    root = user["home"] / "hf"
    local_model(user["home"], {"config.json": 10, "model.safetensors": 1 << 20})
    subprocess.run(["chown", "-R", f"{name}:{name}", str(user["home"])], check=True)
    target = user["home"] / "drop_caches"  # stands in for /proc/sys/vm/drop_caches, writable by root only
    target.write_text("")
    assert page_cache_as(user, root, target) == "@@page-cache evicted 2"
    assert target.read_text() == ""
    grant(user, f"/usr/bin/tee {target}")  # what `setup clear-cache --save-sudo` installs
    assert page_cache_as(user, root, target) == "@@page-cache dropped"
    assert target.read_text() == "3\n"
    user["sudoers"][-1].unlink()
    (root / "hub" / MODEL_DIR / "blobs").chmod(0o700)
    subprocess.run(["chown", "-R", "root:root", str(root / "hub" / MODEL_DIR / "blobs")], check=True)
    assert page_cache_as(user, root, target) == "@@page-cache failed"  # files it cannot open


# -- shared memory left in /dev/shm, and the memory guard while the engine starts ----------------
# Containers share the host's IPC namespace (--ipc host): an engine's POSIX shared memory lives in
# the host's /dev/shm, which on a Spark is the GPU's memory too, until the engine unlinks it.

def segments(host) -> list[str]:
    """The files in the simulated host's /dev/shm."""
    return sorted(p.name for p in host.dev_shm.iterdir()) if host.dev_shm.is_dir() else []


def test_stop_replace_and_rollback_let_the_engines_unlink_their_shared_memory(lab):
    h1, h2 = lab.bed.hosts[:2]
    assert run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync").returncode == 0
    assert run(lab, "qwen3-1.7b-sglang", "-H", H2, "--no-sync", "--port", "8100").returncode == 0
    first = segments(h1)
    assert len(first) == 1 and len(segments(h2)) == 1
    replaced = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert len(segments(h1)) == 1 and segments(h1) != first  # the new engine's only
    stopped = lab("stop", "--all", "-H", f"{H1},{H2}")
    assert stopped.returncode == 0 and "Stopped 2 container(s)." in stopped.stdout, stopped.stderr
    assert segments(h1) == segments(h2) == []
    assert [c[0] for c in h1.docker_calls() if c[0] in ("stop", "rm")][-2:] == ["stop", "rm"]
    h2.fault("engine_exit")  # the worker fails at once: the head's engine is rolled back
    failed = run(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync")
    assert failed.returncode == 1 and "exited" in failed.stderr
    assert segments(h1) == segments(h2) == [] and h1.containers() == h2.containers() == []


def test_a_forced_stop_leaves_shared_memory_that_status_and_the_preflight_name(lab):
    h1 = lab.bed.hosts[0]
    h1.fault("engine_shm_mib", "8192")
    assert run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync").returncode == 0
    forced = lab("stop", "qwen3-1.7b-vllm", "-H", H1, "--force")
    assert forced.returncode == 0 and h1.containers() == []
    assert len(segments(h1)) == 1  # docker rm -f is SIGKILL: as after a crash, until reboot
    status = lab("status", "-H", H1)
    assert sparkrun.shared_memory_note(H1, 8192, False) in status.stdout
    hosts = json.loads(lab("status", "-H", H1, "--json").stdout)["hosts"]
    assert hosts[0]["shmem_mib"] == 8192
    warned = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--gpu-mem", "0.95")
    assert warned.returncode == 0, warned.stderr
    assert [l for l in warned.stderr.splitlines() if l.startswith("Warning:")] == [
        f"Warning: {H1}: needs 115.6 GB (gpu_memory_utilization 0.95 of 121.7 GB) but 108.3 GB is available, "
        + sparkrun.SHARED_MEMORY_HELD.format(size=8.0) + ", or lower --gpu-mem"]
    running = lab("status", "-H", H1)  # an engine runs: its shared memory may be its own
    assert sparkrun.shared_memory_note(H1, 16384, True) in running.stdout
    assert lab("stop", "qwen3-1.7b-vllm", "-H", H1).returncode == 0
    assert len(segments(h1)) == 1  # the graceful stop took the running engine's segment only
