"""benchmark: args and profiles (pure), the command line it builds, and end to end on the test bed:
a real llama-benchy against a real (tiny, random-weight) model served by llama-cpp-python, and a
stand-in framework (an entry-point plugin) for --skip-run, --no-stop and Ctrl+C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import H1, H2, CORPUS, REPO, TESTS
import sparkrun as sr

bench = sr.command_module("benchmark")

VLLM_IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
LLAMA_IMAGE = "sparkrun-test/llama-cpp-python:0.3.36"
PLUGIN = TESTS / "bench_data" / "plugin"
# Simulated hosts have private /root and /tmp: the venv lives elsewhere (.ci/run makes it).
LLAMA_VENV = Path(os.environ.get("SPARKRUN_TEST_LLAMA_VENV", "/var/tmp/sparkrun-testdeps/llama-venv"))
PROFILES = sorted(p for p in CORPUS.rglob("*.yaml") if p.parent.name in ("benchmarking", "benchmarks"))


# -- args, profiles and the command line (no hosts)

def test_args_precedence_framework_recipe_profile_cli():
    framework = bench.LlamaBenchy()
    merged = bench.merge_bench_args(framework, {"pp": [512], "tg": [64], "prefix_caching": True},
                                 {"tg": [32], "depth": [0, 4096]}, bench.bench_overrides(["depth=0,16", "runs=1"]))
    assert merged == {"pp": [512], "tg": [32], "depth": [0, 16], "concurrency": [1], "runs": 1,
                      "enable_prefix_caching": True}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_corpus_profile_builds_a_command(path, capsys):
    profile = bench.read_profile(str(path))
    assert profile.name == path.stem and profile.framework == "llama-benchy"
    framework = bench.load_framework(profile.framework)
    args = bench.merge_bench_args(framework, {}, profile.args, {})
    points = bench.schedule_points(args, profile.schedule)
    job = bench.BenchmarkJob("http://h:8000/v1", "org/model", "served", points[0], "/tok", "http://127.0.0.1:1/p.txt",
                          Path("/r.json"), True)
    argv = framework.argv(job)
    assert argv[argv.index("--model") + 1] == "org/model" and argv[argv.index("--served-model-name") + 1] == "served"
    assert argv[argv.index("--save-result") + 1] == "/r.json" and argv.count("--save-result") == 1
    assert argv[argv.index("--format") + 1] == "json" and argv.count("--format") == 1
    assert "--enable-prefix-caching" in argv and argv[argv.index("--pp") + 1] == "2048"
    if profile.schedule:
        assert len(points) == len(profile.schedule) == 28
        assert [(p["depth"], p["concurrency"]) for p in points[:2]] == [([8192], [5]), ([4096], [5])]
    else:
        depth = argv.index("--depth")
        assert argv[depth + 1:depth + 3] == ["0", "4096"]
    if "save_result" in (profile.args or {}):  # the older nested layout asks for its own CSV: sparkrun keeps JSON
        assert "set by sparkrun; ignored" in capsys.readouterr().err


def test_flags_lists_booleans_and_mappings():
    assert bench.bench_flag("depth", [0, 4096]) == ["--depth", "0", "4096"]
    assert bench.bench_flag("enable_prefix_caching", True) == ["--enable-prefix-caching"]
    assert bench.bench_flag("no_cache", False) == []
    assert bench.bench_flag("extra_body", {"top_k": 1}) == ["--extra-body", "top_k=1"]
    job = bench.BenchmarkJob("http://h:1/v1", "m/m", "m", {"adapt_prompt": False, "tokenizer": "x"}, None, None,
                          Path("/r"), True)
    argv = bench.LlamaBenchy().argv(job)
    assert "--no-adapt-prompt" in argv and "--tokenizer" not in argv and "--book-url" not in argv


def test_recipe_block_in_both_layouts(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: a/b\ncommand: vllm serve a/b\nbenchmark:\n  framework: llama-benchy\n  depth: [0, 4096]\n"
                    "  tokenizer: a/tok\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: a/b\ncommand: vllm serve a/b\nbenchmark:\n  framework: x\n  args: {pp: [1]}\n")
    flat_block, nested_block = (bench.recipe_benchmark_block(sr.load_recipe(p)) for p in (flat, nested))
    assert (flat_block.framework, flat_block.args) == ("llama-benchy", {"depth": [0, 4096], "tokenizer": "a/tok"})
    assert (nested_block.framework, nested_block.args) == ("x", {"pp": [1]})


def test_recipe_block_timeout_and_schedule_are_not_framework_args(cli, tmp_path):
    recipe = tmp_path / "timed.yaml"
    recipe.write_text((REPO / "recipes" / "qwen3-1.7b-vllm.yaml").read_text() + (
        "\nbenchmark:\n  timeout: 5400\n  tg: [64]\n"
        "  schedule:\n    - {depth: 0, concurrency: 1}\n    - {depth: 4096, concurrency: 2}\n"))
    block = bench.recipe_benchmark_block(sr.load_recipe(recipe))
    assert (block.timeout, block.args) == (5400, {"tg": [64]}) and len(block.schedule) == 2
    result = cli("benchmark", recipe, "-H", H1, "--dry-run", check=0)
    assert "Benchmark (llama-benchy, 2 run(s), timeout 5400 s)" in result.stdout
    commands = [l for l in result.stdout.splitlines() if "--base-url" in l]
    assert len(commands) == 2 and "--depth 4096 --concurrency 2" in commands[1]
    assert not [c for c in commands if "--timeout" in c or "--schedule" in c]
    profile = tmp_path / "short.yaml"
    profile.write_text("timeout: 60\n")  # a profile's timeout and schedule win over the recipe's
    assert "timeout 60 s" in cli("benchmark", recipe, "-H", H1, "--dry-run", "--profile", profile, check=0).stdout


def test_profile_args_directly_under_benchmark_and_empty_profiles(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("benchmark:\n  framework: llama-benchy\n  depth: [0, 8192]\n  concurrency: [2]\n  timeout: 900\n")
    profile = bench.read_profile(str(flat))
    assert profile.args == {"depth": [0, 8192], "concurrency": [2]} and profile.timeout == 900
    for text in ("description: nothing here\n", "metadata: {description: x}\n", "benchmark: {}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(sr.UsageError) as error:
            bench.read_profile(str(tmp_path / "empty.yaml"))
        assert str(error.value) == bench.PROFILE_EMPTY.format(path=tmp_path / "empty.yaml")


def test_bundled_prompt_text_is_packaged():
    import tomllib

    assert bench.prompt_text_file().is_file() and len(bench.prompt_text_file().read_text()) > 5000
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert data["package-dir"]["sparkrun_recipes"] == "recipes"
    assert "*.txt" in data["package-data"]["sparkrun_recipes"]


def test_prompt_server_serves_only_the_text():
    import urllib.error
    import urllib.request

    with bench.PromptServer(bench.prompt_text_file()) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(server.url, timeout=5).read() == bench.prompt_text_file().read_bytes()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url.rsplit("/", 1)[0] + "/etc/passwd", timeout=5)


def test_dry_run_prints_plan_and_every_scheduled_command(cli):
    profile = CORPUS / "spark-arena-recipe-registry" / "benchmarking" / "spark-arena-v2.yaml"
    result = cli("benchmark", "qwen3-1.7b-vllm", "-H", H1, "--profile", profile, "--dry-run", check=0)
    assert "Steps:" in result.stdout and "vllm serve Qwen/Qwen3-1.7B" in result.stdout
    assert "Benchmark (llama-benchy, 28 run(s), timeout 14400 s) -> benchmark_qwen3-1.7b-vllm_spark-arena-v2_tp1.yaml" \
        in result.stdout
    commands = [l for l in result.stdout.splitlines() if "--base-url" in l]
    assert len(commands) == 28 and "--depth 8192 --concurrency 5" in commands[0]
    assert all("--model Qwen/Qwen3-1.7B " in c and "--book-url 'http://127.0.0.1:<port>/" in c for c in commands)


def test_missing_tokenizer_offline_says_what_to_do(cli):
    result = cli("benchmark", "qwen3-1.7b-vllm", "-H", H1)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "Error: " + bench.TOKENIZER_MISSING.format(
        name="Qwen/Qwen3-1.7B", home=cli.home / "hf")


def test_llama_benchy_not_installed_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("SPARKRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SPARKRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARKRUN_DEFAULT_REGISTRIES", "")
    assert sr.main(["benchmark", "qwen3-1.7b-vllm", "-H", H1]) == 1
    assert capsys.readouterr().err.strip() == f"Error: {bench.LLAMA_BENCHY_MISSING}"


def test_unknown_framework_lists_the_known_ones(cli):
    result = cli("benchmark", "qwen3-1.7b-vllm", "-H", H1, "--framework", "nope", env={"PYTHONPATH": str(PLUGIN)})
    assert result.returncode == 2
    assert "unknown benchmark framework 'nope' (known: fakebench, llama-benchy)" in result.stderr


# -- on the test bed, with the stand-in framework and the fake vLLM engine

@pytest.fixture
def lab(bed, tmp_path):
    bed.bed.add_image(VLLM_IMAGE, size_bytes=4096)
    bed.env["PYTHONPATH"] = str(PLUGIN)
    tokenizer = tmp_path / "tokenizer.json"
    sys.path.insert(0, str(TESTS / "bench_data"))
    from tiny_model import train_tokenizer

    train_tokenizer(bench.prompt_text_file().read_text()).save(str(tokenizer))
    bed.tokenizer = tokenizer
    yield bed
    bed("stop", "--all", "-H", f"{H1},{H2}")


def fake_bench(lab, *args, timeout=120):
    return lab("benchmark", "qwen3-1.7b-vllm", "--framework", "fakebench", "-o", f"tokenizer={lab.tokenizer}",
               "--no-sync", *map(str, args), timeout=timeout)


def running(host):
    return [c["name"] for c in host.containers() if c["running"]]


def test_skip_run_benchmarks_the_running_instance_and_leaves_it(lab, tmp_path):
    assert lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow", "--port", "8123").returncode == 0
    (name,) = running(lab.bed.hosts[0])
    lab.bed.hosts[0].clear_docker_calls()
    out = tmp_path / "skip.yaml"
    result = fake_bench(lab, "-H", f"{H1},{H2}", "--skip-run", "-o", "depth=0,16", "-o", "concurrency=1,2",
                        "--out", out)
    assert result.returncode == 0, result.stderr
    assert running(lab.bed.hosts[0]) == [name]
    assert not [c for c in lab.bed.hosts[0].docker_calls() if c[:1] in (["run"], ["rm"])]
    record = yaml.safe_load(out.read_text())
    assert record["status"] == "complete" and record["endpoint"] == f"http://{H1}:8123/v1"
    assert [(r["depth"], r["concurrency"]) for r in record["results"]["rows"]] == [(0, 1), (0, 2), (16, 1), (16, 2)]
    assert all(r["answered"] for r in record["results"]["rows"])
    raw = record["results"]["runs"][0]["raw"]
    assert raw["prompt_chars"] == len(bench.prompt_text_file().read_text())  # served on 127.0.0.1
    assert raw["tokenizer"] == str(lab.tokenizer)
    assert record["container"]["image_id"] == lab.bed.hosts[0].containers()[0]["image_id"]
    assert record["container"]["image"] == VLLM_IMAGE and record["hosts"] == [H1]
    assert record["recipe"]["name"] == "qwen3-1.7b-vllm" and record["recipe"]["hash"].startswith("sha256:")
    assert record["recipe"]["text"] == (REPO / "recipes" / "qwen3-1.7b-vllm.yaml").read_text()
    assert record["framework"] == {"name": "fakebench", "version": "0.1"}
    assert "DEPTH" in result.stdout and f"Results: {out}" in result.stdout


def test_skip_run_with_nothing_running(lab):
    result = fake_bench(lab, "-H", H1, "--skip-run")
    assert result.returncode == 1
    assert f"Error: {bench.NOT_RUNNING.format(recipe='qwen3-1.7b-vllm', hosts=H1)}" in result.stderr


def test_launch_benchmark_stop_and_no_stop(lab, tmp_path):
    out = tmp_path / "one.yaml"
    result = fake_bench(lab, "-H", H1, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"Ready: http://{H1}:8000/v1" in result.stdout and running(lab.bed.hosts[0]) == []
    record = yaml.safe_load(out.read_text())
    assert record["status"] == "complete" and record["tp"] == 1 and len(record["results"]["rows"]) == 1
    assert record["args"] == {"depth": [0], "concurrency": [1], "tokenizer": str(lab.tokenizer)}
    result = fake_bench(lab, "-H", H1, "--out", out, "--no-stop")
    assert result.returncode == 0, result.stderr
    assert len(running(lab.bed.hosts[0])) == 1 and "Detached; the server keeps running." in result.stderr


def test_default_output_name_and_profile_schedule(lab, tmp_path):
    profile = tmp_path / "two-points.yaml"
    profile.write_text("framework: fakebench\nmetadata: {description: two points}\nargs: {depth: [0, 1, 2]}\n"
                       "schedule:\n  - {depth: 2, concurrency: 1}\n  - {depth: 0, concurrency: 3}\ntimeout: 60\n")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "sparkrun.py"), "benchmark", "qwen3-1.7b-vllm", "-H", H1,
                             "--profile", str(profile), "-o", f"tokenizer={lab.tokenizer}", "--no-sync"],
                            cwd=work, env=lab.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    record = yaml.safe_load((work / "benchmark_qwen3-1.7b-vllm_two-points_tp1.yaml").read_text())
    assert [(r["depth"], r["concurrency"]) for r in record["results"]["rows"]] == [(2, 1), (0, 3)]
    assert len(record["results"]["runs"]) == 2 and record["timeout"] == 60
    assert record["profile"]["description"] == "two points"


def test_ctrl_c_keeps_partial_results_and_stops_the_server(lab, tmp_path):
    out = tmp_path / "partial.yaml"
    process = subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), "benchmark", "qwen3-1.7b-vllm", "-H", H1,
                                "--framework", "fakebench", "-o", f"tokenizer={lab.tokenizer}", "--no-sync",
                                "-o", "depth=0,1,2", "-o", "sleep=1.5", "--out", str(out)],
                               env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    seen = []
    for line in process.stderr:  # the framework has started once sparkrun shows its command
        seen.append(line)
        if line.startswith("$ "):
            break
    time.sleep(2.5)  # the first point (1.5 s) is done, the second is not
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=90)
    stderr = "".join(seen) + stderr
    assert process.returncode == 130, stderr
    assert bench.BENCHMARK_INTERRUPTED.format(path=out) in stderr
    record = yaml.safe_load(out.read_text())
    assert record["status"] == "interrupted" and 1 <= len(record["results"]["rows"]) < 3
    assert running(lab.bed.hosts[0]) == []


# -- end to end: real llama-benchy, real llama-cpp-python server on a simulated host, offline

def llama_ready() -> str:
    """'' when the end-to-end test can run, else why not."""
    missing = [name for name in ("gguf", "tokenizers", "llama_benchy") if not __import__("importlib").util.find_spec(name)]
    if missing:
        return f"python3 -m pip install {' '.join(missing).replace('_', '-')}"
    if not any(LLAMA_VENV.glob("lib/python3*/site-packages/llama_cpp/server")):
        return f"a system-Python venv with llama-cpp-python[server] at {LLAMA_VENV} (see .ci/run)"
    return ""


def test_end_to_end_llama_benchy_against_llama_cpp_python(bed, tmp_path):
    why = llama_ready()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the end-to-end benchmark; missing: {why}")
        pytest.skip(f"needs {why}")
    sys.path.insert(0, str(TESTS / "bench_data"))
    from tiny_model import make_cached_model

    repo = "sparkrun-test/tiny-llama-GGUF"
    make_cached_model(bed.home / "hf", repo, "F32", bench.prompt_text_file().read_text())
    image_id = bed.bed.add_image(LLAMA_IMAGE, size_bytes=4096, hosts=[1])
    recipe = tmp_path / "tiny-llama.yaml"
    recipe.write_text(f"""model: {repo}:F32
runtime: llama-cpp
container: {LLAMA_IMAGE}
metadata: {{description: tiny random-weight llama for the benchmark test, model_dtype: f32}}
defaults: {{port: 8000, served_model_name: tiny, ctx_size: 2048}}
env: {{LLAMA_PY_VENV: {LLAMA_VENV}}}
benchmark: {{framework: llama-benchy, pp: [32], tg: [8], runs: 3}}
command: llama-cpp-python-server -hf {{model}} --alias {{served_model_name}} --host {{host}} --port {{port}} --ctx-size {{ctx_size}}
""")
    out = tmp_path / "e2e.yaml"
    started = time.monotonic()
    result = bed("benchmark", recipe, "-H", H1, "--out", out, "-o", "depth=0,16", "-o", "concurrency=1,2",
                 "-o", "runs=1", "-o", "skip_coherence=true", "-o", "prefix_caching=true", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    record = yaml.safe_load(out.read_text())
    assert record["status"] == "complete"
    assert record["args"] == {"pp": [32], "tg": [8], "depth": [0, 16], "concurrency": [1, 2], "runs": 1,
                              "skip_coherence": True, "enable_prefix_caching": True}
    assert record["container"] == {"image": LLAMA_IMAGE, "image_id": image_id}
    assert record["model"] == {"id": f"{repo}:F32", "revision": "0" * 40, "dtype": "f32"}
    assert record["runtime"] == "llama-cpp" and record["hosts"] == [H1] and record["served_model"] == "tiny"
    raw = record["results"]["runs"][0]["raw"]
    assert raw["model"] == repo and len(raw["benchmarks"]) == 6
    rows = record["results"]["rows"]
    points = sorted({(r["depth"], r["concurrency"]) for r in rows})
    assert points == [(0, 1), (0, 2), (16, 1), (16, 2)]
    assert len([r for r in rows if r["phase"] == "context"]) == 2  # prefix caching: a context load per depth > 0
    assert all(r["pp"] == 32 and r["tg"] == 8 and r["ttfr_ms"] > 0 for r in rows)
    # Throughputs are llama-benchy's own, None where it reports none (a prefill too fast to time).
    def means(key):
        return sorted((round(b[key]["mean"], 3) if b[key] else -1) for b in raw["benchmarks"])
    assert sorted(-1 if r["pp_tps"] is None else r["pp_tps"] for r in rows) == means("pp_throughput")
    assert sorted(-1 if r["tg_tps"] is None else r["tg_tps"] for r in rows) == means("tg_throughput")
    # The command sparkrun ran: offline, the cached tokenizer, the bundled text served locally.
    command = next(l for l in result.stderr.splitlines() if l.startswith("$ ") and "--base-url" in l)
    assert f"--base-url http://{H1}:8000/v1 --model {repo} --served-model-name tiny" in command
    assert "--tokenizer " + str(bed.home / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)) \
        in command
    assert "--book-url http://127.0.0.1:" in command
    assert list((bed.bed.control_home / ".cache" / "llama-benchy").glob("*.txt")) == []
    for header in ("DEPTH", "PP T/S", "TG T/S", "TTFR MS"):
        assert header in result.stdout
    # The server was stopped.
    host = bed.bed.hosts[0]
    assert [c for c in host.containers() if c["running"]] == []
    deadline = time.monotonic() + 5
    while host.processes_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host.processes_alive() == []
    print(f"end-to-end benchmark took {time.monotonic() - started:.1f} s")
