"""tune on the test bed, with stand-in tuning scripts (tests/testbed/engines/benchmark*/, found in the
fake image's engine source tree with --skip-clone, or cloned from a local mirror): configs land in
the output folder, -j runs jobs at once, tuned sizes are skipped, and the next run mounts them."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import H1, H2

import sparkrun as sr

SGLANG_IMAGE = "scitrera/dgx-spark-sglang:0.5.9-t5"
VLLM_IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
MODEL = "test-org/tiny-moe"


@pytest.fixture
def lab(bed, tmp_path):
    for image in (SGLANG_IMAGE, VLLM_IMAGE):
        bed.bed.add_image(image, size_bytes=4096)
    for host in bed.bed.hosts:
        (host.root / "tune-calls.jsonl").unlink(missing_ok=True)
    snapshot = bed.home / "hf" / "hub" / "models--test-org--tiny-moe" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("1" * 40)
    (snapshot / "config.json").write_text(json.dumps({"num_experts": 8, "moe_intermediate_size": 1024}))
    (snapshot / "model.safetensors").write_bytes(b"\0" * 1024)  # never copied for tuning
    for engine, command in (("sglang", "python3 -m sglang.launch_server --model-path {model} --host {host} "
                                       "--port {port} --tp-size {tensor_parallel}"),
                            ("vllm", "vllm serve {model} --host {host} --port {port} -tp {tensor_parallel}")):
        image = SGLANG_IMAGE if engine == "sglang" else VLLM_IMAGE
        (tmp_path / f"moe-{engine}.yaml").write_text(
            f"model: {MODEL}\nruntime: {engine}\ncontainer: {image}\n"
            f"defaults: {{port: 8000, tensor_parallel: 1}}\ncommand: {command}\n")
    bed.recipes = tmp_path
    bed.tuning = Path(bed.env["SPARKRUN_CACHE_DIR"]) / "tuning"
    yield bed
    bed("stop", "--all", "-H", f"{H1},{H2}")
    shutil.rmtree(bed.tuning, ignore_errors=True)  # the control cache is shared by the session's tests


def calls(host):
    path = host.root / "tune-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def max_overlap(entries) -> int:
    events = sorted([(e["start"], 1) for e in entries] + [(e["end"], -1) for e in entries])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_tune_sglang_in_parallel_skips_tuned_sizes_and_the_next_run_mounts_them(lab):
    host = lab.bed.hosts[0]
    host.fault("tune_sleep", "1.5")
    recipe = lab.recipes / "moe-sglang.yaml"
    result = lab("tune", "sglang", recipe, "-H", f"{H1},{H2}", "--tp", "1", "--tp", "2", "--tp", "4", "-j", "2",
                 "--skip-clone", timeout=180)
    assert result.returncode == 0, result.stderr
    out = lab.tuning / "sglang"
    names = {f"E=8,N={1024 // tp},device_name=NVIDIA_GB10.json" for tp in (1, 2, 4)}
    assert {p.name for p in out.glob("*.json")} == names | {sr.TUNING_MANIFEST}
    manifest = json.loads((out / sr.TUNING_MANIFEST).read_text())
    assert sorted(manifest["models"][MODEL]) == ["1", "2", "4"]
    entries = calls(host)
    assert sorted(e["tp"] for e in entries) == [1, 2, 4] and all(e["tune"] and e["model"] == MODEL for e in entries)
    assert max_overlap(entries) == 2  # -j 2: two at a time, never three
    assert all(e["model_cached"] and e["offline"] == "1" for e in entries)  # the config was synced first
    assert not (host.home / ".cache/huggingface/hub/models--test-org--tiny-moe/snapshots" / ("1" * 40)
                / "model.safetensors").exists()
    assert calls(lab.bed.hosts[1]) == []  # the first host only
    assert [c for c in host.containers()] == []  # the tuning container is gone

    again = lab("tune", "sglang", recipe, "-H", H1, "--tp", "2", "--tp", "8", "--skip-clone", timeout=180)
    assert again.returncode == 0, again.stderr
    assert f"TP 2: already tuned for {MODEL}" in again.stderr
    assert [e["tp"] for e in calls(host)][3:] == [8]

    ran = lab("run", recipe, "-H", H2, "--no-sync", "--no-follow")
    assert ran.returncode == 0, ran.stderr
    assert "tuned sglang MoE configs mounted (TP 1, 2, 4, 8 tuned here)" in ran.stderr
    (call,) = [c for c in lab.bed.hosts[1].docker_calls() if c[:1] == ["run"]]
    assert "/root/.cache/sparkrun/tuning/sglang:/root/.cache/sparkrun/tuning/sglang/configs:ro" in call
    assert "SGLANG_MOE_CONFIG_DIR=/root/.cache/sparkrun/tuning/sglang" in call
    synced = lab.bed.hosts[1].home / ".cache/sparkrun/tuning/sglang"
    assert {p.name for p in synced.glob("E=*.json")} == names | {"E=8,N=128,device_name=NVIDIA_GB10.json"}

    lab.bed.hosts[1].clear_docker_calls()
    plain = lab("run", recipe, "-H", H2, "--no-sync", "--no-follow", "--replace", "--no-sync-tuning")
    assert plain.returncode == 0, plain.stderr
    (call,) = [c for c in lab.bed.hosts[1].docker_calls() if c[:1] == ["run"]]
    assert not any("tuning" in word for word in call)


def test_tune_vllm_clones_the_scripts_and_the_run_sets_its_variable(lab):
    host = lab.bed.hosts[0]
    mirror = host.home / "vllm-mirror"
    script = mirror / "benchmarks" / "kernels" / "benchmark_moe.py"
    script.parent.mkdir(parents=True)
    engines = Path(__file__).parent / "testbed" / "engines"
    shutil.copy(engines / "tune_standin.py", mirror / "tune_standin.py")
    shutil.copy(engines / "benchmarks" / "kernels" / "benchmark_moe.py", script)
    for argv in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"]):
        subprocess.run(["git", *argv], cwd=mirror, check=True)
    recipe = lab.recipes / "moe-vllm.yaml"
    result = lab("tune", "vllm", recipe, "-H", H1, "--tp", "2", timeout=180,
                 env={"SPARKRUN_VLLM_REPO": "/root/vllm-mirror"})
    assert result.returncode == 0, result.stderr
    assert "scripts in /root/.cache/sparkrun/tune/vllm/src" in result.stderr
    (entry,) = calls(host)
    assert entry["cwd"] == "/root/.cache/sparkrun/tune/vllm/work/tp2"
    assert (lab.tuning / "vllm" / "E=8,N=512,device_name=NVIDIA_GB10.json").is_file()

    ran = lab("run", recipe, "-H", H1, "--no-sync", "--no-follow")
    assert ran.returncode == 0, ran.stderr
    (call,) = [c for c in host.docker_calls() if c[:1] == ["run"] and "sleep infinity" not in c]
    assert "/root/.cache/sparkrun/tuning/vllm:/root/.cache/sparkrun/tuning/vllm:ro" in call
    assert "VLLM_TUNED_CONFIG_FOLDER=/root/.cache/sparkrun/tuning/vllm" in call


def test_clone_failure_suggests_skip_clone(lab):
    result = lab("tune", "vllm", lab.recipes / "moe-vllm.yaml", "-H", H1, "--tp", "1", timeout=120,
                 env={"SPARKRUN_VLLM_REPO": "/root/no-such-mirror"})
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: could not fetch the vllm tuning scripts from /root/no-such-mirror (")
    assert "pass --skip-clone to use the scripts inside the image" in line
    assert lab.bed.hosts[0].containers() == []


def test_engine_must_match_the_recipe_unless_an_image_is_given(cli, tmp_path):
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"model: {MODEL}\nruntime: vllm\ncontainer: {VLLM_IMAGE}\ncommand: vllm serve {{model}}\n")
    wrong = cli("tune", "sglang", recipe, "-H", H1, "--dry-run")
    assert wrong.returncode == 2 and "runs on vllm-distributed, not sglang; pass --image" in wrong.stderr
    assert cli("tune", "sglang", recipe, "-H", H1, "--dry-run", "--image", SGLANG_IMAGE).returncode == 0


def test_dry_run_contacts_nothing(cli, tmp_path):
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"model: {MODEL}\nruntime: sglang\ncontainer: {SGLANG_IMAGE}\n"
                      "command: python3 -m sglang.launch_server --model-path {model} --port {port}\n")
    result = cli("tune", "sglang", recipe, "-H", "spark-9", "--dry-run", check=0)
    assert "TP sizes:    1, 2, 4, 8" in result.stdout and "Host:        spark-9" in result.stdout
    assert "sleep infinity" in result.stdout and result.stdout.count("--tune") == 4
    assert "Scripts:     https://github.com/sgl-project/sglang.git" in result.stdout


def test_registry_tuning_configs_are_merged_and_mounted_local_ones_win(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARKRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARKRUN_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "config").mkdir()
    sr.registries_file().write_text("registries: [{name: reg, url: x, clone: reg, recipes: recipes, tuning: tuning}]\n")
    registry = tmp_path / "cache" / "registries" / "reg" / "tuning"
    (registry / "sglang" / "triton_3_4_0").mkdir(parents=True)
    (registry / "sglang" / "triton_3_4_0" / "E=8,N=512,device_name=NVIDIA_GB10.json").write_text('{"from": "registry"}')
    (registry / "sglang" / "E=8,N=256,device_name=NVIDIA_GB10.json").write_text('{"from": "registry"}')
    (registry / "vllm").mkdir()
    (registry / "vllm" / "E=8,N=1,device_name=NVIDIA_GB10.json").write_text("{}")
    local = sr.tuning_dir("sglang")
    local.mkdir(parents=True)
    (local / "E=8,N=256,device_name=NVIDIA_GB10.json").write_text('{"from": "here"}')
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"model: {MODEL}\nruntime: sglang\ncontainer: {SGLANG_IMAGE}\n"
                      "command: python3 -m sglang.launch_server --model-path {model} --port {port}\n")
    mount = sr.tuning_mount(sr.load_recipe(recipe))
    assert mount.env == ("SGLANG_MOE_CONFIG_DIR", "/root/.cache/sparkrun/tuning/sglang")
    assert mount.container == "/root/.cache/sparkrun/tuning/sglang/configs" and mount.local == local
    assert mount.note == "tuned sglang MoE configs mounted (1 from registries)"
    assert json.loads((local / "triton_3_4_0" / "E=8,N=512,device_name=NVIDIA_GB10.json").read_text()) == {"from": "registry"}
    assert json.loads((local / "E=8,N=256,device_name=NVIDIA_GB10.json").read_text()) == {"from": "here"}
    assert not (local / "E=8,N=1,device_name=NVIDIA_GB10.json").exists()  # another engine's
    plain = tmp_path / "dense.yaml"
    plain.write_text("model: a/b\nruntime: llama-cpp\ncontainer: x\ncommand: llama-server -m /m.gguf\n")
    assert sr.tuning_mount(sr.load_recipe(plain)) is None
