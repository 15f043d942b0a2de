"""Recipe loading, validation, runtime resolution, templating and lookup."""

import re

import pytest

import sparkrun as sr
from conftest import CORPUS, REPO


def corpus_recipe_files():
    """Every recipe YAML in the corpus: not manifests, not benchmark profiles."""
    if not CORPUS.is_dir():
        return []
    files = []
    for path in sorted(CORPUS.rglob("*.yaml")):
        parts = set(path.relative_to(CORPUS).parts)
        if parts & {".sparkrun", "benchmarking", "benchmarks"}:
            continue
        files.append(path)
    return files


# Recipes that really are odd, with the warnings they must produce (by path in the corpus).
EXECUTOR_CONFIG = ["unknown field 'executor_config' kept in runtime_config"]
LLAMA_RPC = ["llama-cpp multi-node (rpc-server) is experimental"]
# eugr's gpu-mem-util-gb mod takes gigabytes in the same slot.
GPU_MEM_GB = ["defaults.gpu_memory_utilization is 108, not a fraction in (0, 1]; the VRAM estimate ignores it"]
EXPECTED_WARNINGS = {
    "dbotwinick-sparkrun-recipe-registry/transitional/recipes/qwen3.5/llama-cpp/qwen3.5-397b-gguf-q6k-llama-cpp.yaml": LLAMA_RPC,
    "eugr-spark-vllm-docker/recipes/qwen3.5-397b-int4-autoround.yaml": GPU_MEM_GB,
    "eugr-spark-vllm-docker/recipes/step-3.7-flash-fp8.yaml": GPU_MEM_GB,
    "spark-arena-recipe-registry/experimental-recipes/minimax-m3/minimax-m3-v0-nvfp4-2x-reap25.yaml": EXECUTOR_CONFIG,
    "spark-arena-recipe-registry/experimental-recipes/minimax-m3/minimax-m3-v0-nvfp4-2x-reap50.yaml": EXECUTOR_CONFIG,
    "spark-arena-recipe-registry/experimental-recipes/minimax-m3/minimax-m3-v0-nvfp4-4x.yaml": EXECUTOR_CONFIG,
    "sparkrun-formerly-bundled/recipes/qwen3.5-gguf/qwen3.5-397b-gguf-q3km-llama-cpp.yaml": LLAMA_RPC,
    "sparkrun-formerly-bundled/recipes/qwen3.5-gguf/qwen3.5-397b-gguf-q6k-llama-cpp.yaml": LLAMA_RPC,
}


def test_corpus_is_present():
    assert len(corpus_recipe_files()) >= 80, f"recipe corpus missing or incomplete at {CORPUS}"


@pytest.mark.parametrize("path", corpus_recipe_files(), ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_recipe_loads_validates_renders(path):
    recipe = sr.load_recipe(path)
    errors, warnings = sr.validate_recipe(recipe)
    assert errors == []
    assert warnings == EXPECTED_WARNINGS.get(str(path.relative_to(CORPUS)), [])
    rendered = sr.render_command(recipe, sr.recipe_values(recipe))
    assert not re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", rendered)
    if recipe.recipe_version == "1":
        assert "{{" not in rendered and "}}" not in rendered
    assert recipe.runtime in sr.RUNTIMES


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "model: org/m\ncontainer: img:1\n"


@pytest.mark.parametrize("text, runtime", [
    (BASE + "runtime: vllm\ncommand: vllm serve {model}\n", "vllm-distributed"),
    (BASE + "runtime: vllm\ndefaults: {distributed_executor_backend: ray}\ncommand: vllm serve {model}\n", "vllm-ray"),
    (BASE + "runtime: vllm\ncommand: vllm serve {model} --distributed-executor-backend ray\n", "vllm-ray"),
    (BASE + "runtime: vllm-ray\ncommand: vllm serve {model}\n", "vllm-ray"),
    (BASE + "runtime: sglang\ncommand: sglang serve --model-path {model}\n", "sglang"),
    (BASE + "command: vllm serve {model}\n", "vllm-distributed"),
    (BASE + "command: sglang serve --model-path {model}\n", "sglang"),
    (BASE + "command: python3 -m sglang.launch_server --model-path {model}\n", "sglang"),
    (BASE + "command: llama-server -hf {model}\n", "llama-cpp"),
    (BASE + "recipe_version: '1'\ncommand: vllm serve org/m\n", "eugr-vllm"),
    (BASE + "build_args: [--tf5]\ncommand: vllm serve org/m\n", "eugr-vllm"),
    (BASE + "runtime: vllm\nbuild_args: [--tf5]\ncommand: vllm serve org/m\n", "eugr-vllm"),
    (BASE + "runtime: llama-cpp\ncommand: llama-server -hf {model}\n", "llama-cpp"),
    (BASE + "mods: [mods/fix]\ncommand: vllm serve org/m\n", "eugr-vllm"),
    (BASE + "runtime_config: {mods: [mods/fix]}\ncommand: vllm serve org/m\n", "eugr-vllm"),
    (BASE + "runtime: vllm\nmods: [mods/fix]\ncommand: vllm serve org/m\n", "vllm-distributed"),
    (BASE + "command: \"vllm serve {model} --distributed-executor-backend\\tray\"\n", "vllm-ray"),
    (BASE + "command: |\n  vllm serve {model} --distributed-executor-backend \\\n      ray --port 8000\n", "vllm-ray"),
    (BASE + "command: vllm serve {model} --distributed-executor-backend=ray\n", "vllm-ray"),
    (BASE + "command: vllm serve {model} --distributed-executor-backend mp --x ray\n", "vllm-distributed"),
])
def test_runtime_resolution(tmp_path, text, runtime):
    assert sr.load_recipe(write(tmp_path, text)).runtime == runtime


def test_v2_raw_json_passes_through_and_placeholders_fill(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + (
        "defaults: {port: 9000, spec: '{\"method\": \"mtp\"}'}\n"
        "command: |\n  vllm serve {model} --port {port} --speculative-config '{spec}' "
        "--hf-overrides '{\"a\": {\"b\": 1}}' --x {{literal}}\n")))
    rendered = sr.render_command(recipe, sr.recipe_values(recipe))
    assert rendered.strip() == ("vllm serve org/m --port 9000 --speculative-config '{\"method\": \"mtp\"}' "
                                "--hf-overrides '{\"a\": {\"b\": 1}}' --x {{literal}}")


def test_v1_unescapes_braces(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + (
        "recipe_version: '1'\ndefaults: {port: 8000}\n"
        "command: \"vllm serve org/m --port {port} --cfg '{{\\\"k\\\": 1}}'\"\n")))
    assert sr.render_command(recipe, sr.recipe_values(recipe)) == "vllm serve org/m --port 8000 --cfg '{\"k\": 1}'"


def test_value_precedence_cli_over_defaults_over_builtins(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + "defaults: {port: 9000}\ncommand: x {model} {host} {port}\n"))
    assert sr.render_command(recipe, sr.recipe_values(recipe)) == "x org/m 0.0.0.0 9000"
    assert sr.render_command(recipe, sr.recipe_values(recipe, {"port": 7000, "host": "1.2.3.4"})) == "x org/m 1.2.3.4 7000"


def test_missing_placeholder_named(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + "command: vllm serve {model} --x {nothing_here}\n"))
    errors, _ = sr.validate_recipe(recipe)
    assert errors == ["command uses {nothing_here} with no default value"]
    with pytest.raises(sr.UsageError, match=r"no value for \{nothing_here\}"):
        sr.render_command(recipe, sr.recipe_values(recipe))


@pytest.mark.parametrize("pair, value", [
    ("a=true", True), ("a=False", False), ("a=3", 3), ("a=0.5", 0.5), ("a=fp8", "fp8"), ("a=", ""),
    ("a={x:1}", "{x:1}"),
])
def test_override_coercion(pair, value):
    assert sr.parse_overrides([pair]) == {"a": value}


@pytest.mark.parametrize("pair", ["a=1;rm -rf /", "a=$(id)", "a=`id`", "a=x|y", "noequals", "bad key=1",
                                  'a={"x": 1}', "a=x --trust-remote-code"])
def test_override_rejects_unsafe_or_malformed(pair):
    with pytest.raises(sr.UsageError):
        sr.parse_overrides([pair])


def test_bools_render_lowercase(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + "defaults: {flag: true}\ncommand: x --f {flag}\n"))
    assert sr.render_command(recipe, sr.recipe_values(recipe)) == "x --f true"


def test_unknown_keys_kept_and_listed(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + "command: vllm serve {model}\nexecutor_config: {user: root}\n"))
    assert recipe.runtime_config == {"executor_config": {"user": "root"}}
    assert sr.validate_recipe(recipe)[1] == ["unknown field 'executor_config' kept in runtime_config"]


def test_node_count_is_tp_times_pp(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + "defaults: {tensor_parallel: 2, pipeline_parallel: 3}\ncommand: x\n"))
    assert sr.node_count(recipe, sr.recipe_values(recipe)) == 6
    assert sr.node_count(recipe, sr.recipe_values(recipe, {"tensor_parallel": 1})) == 3


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed\n", "malformed YAML (line 2)"),
    ("- just\n- a list\n", "a recipe must be a YAML mapping of fields"),
    (BASE + "command: x\nmin_nodes: two\n", "field 'min_nodes' must be integer, not 'two'"),
    (BASE + "command: x\nmin_nodes: 3\nmax_nodes: 2\n", "field 'max_nodes' (2) is less than min_nodes (3)"),
    (BASE + "command: x\nsolo_only: 'yes'\n", "field 'solo_only' must be bool"),
    ("container: c\ncommand: x\n", "field 'model' is required"),
    (BASE + "command: x\nruntime: tensorrt\n", "unknown runtime 'tensorrt'"),
])
def test_bad_recipes_one_line_exit_2(tmp_path, cli, text, message):
    path = write(tmp_path, text, "bad-recipe.yaml")
    result = cli("show", path, "--no-vram")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"Error: {path}: ")
    assert message in lines[0]
    result = cli("recipe", "validate", path)
    assert result.returncode == 2 and message in result.stdout


def test_show_golden(cli):
    result = cli("show", "nemotron3-nano-30b-nvfp4-vllm", "--no-vram", check=0)
    assert result.stdout == """\
Name:         nemotron3-nano-30b-nvfp4-vllm
Description:  NVIDIA Nemotron 3 Nano 30B (upstream NVFP4) -- cluster or solo
Runtime:      vllm
Model:        nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4
Container:    scitrera/dgx-spark-vllm:0.16.0-t5
Nodes:        1 - unlimited
Repository:   Local

Defaults:
  gpu_memory_utilization: 0.8
  max_model_len: 200000
  port: 8000
  served_model_name: nemotron3-30b-a3b
  tensor_parallel: 1
"""


def test_list_search_json(cli):
    import json
    names = [r["name"] for r in json.loads(cli("list", "--json", check=0).stdout)]
    assert {"qwen3-1.7b-vllm", "qwen3-1.7b-sglang", "qwen3-1.7b-llama-cpp", "nemotron3-nano-30b-nvfp4-vllm"} <= set(names)
    found = json.loads(cli("search", "llama.cpp", "--json", check=0).stdout)
    assert [r["name"] for r in found] == ["qwen3-1.7b-llama-cpp"]
    assert [r["name"] for r in json.loads(cli("list", "--runtime", "sglang", "--json", check=0).stdout)] == ["qwen3-1.7b-sglang"]
    shown = json.loads(cli("show", "qwen3-1.7b-sglang", "--json", check=0).stdout)
    assert shown["runtime"] == "sglang" and shown["repository"] == "Local"
    text = cli("list", check=0).stdout
    assert text.splitlines()[0].split() == ["NAME", "RUNTIME", "NODES", "MODEL", "DESCRIPTION"]
    assert "\033[" not in text


def test_lookup_suggests_close_names(cli):
    result = cli("show", "qwen3-1.7b-vlm")
    assert result.returncode == 2
    assert "no recipe named 'qwen3-1.7b-vlm'; did you mean qwen3-1.7b-vllm" in result.stderr


def test_lookup_by_path_and_save(cli, tmp_path):
    src = CORPUS / "eugr-spark-vllm-docker" / "recipes" / "openai-gpt-oss-120b.yaml"
    saved = tmp_path / "copy.yaml"
    result = cli("show", src, "--no-vram", "--save", saved, check=0)
    assert "Runtime:      eugr-vllm" in result.stdout
    assert saved.read_text() == src.read_text()


def test_validate_bundled_recipes(cli):
    names = [p.stem for p in (REPO / "recipes").glob("*.yaml")]
    result = cli("recipe", "validate", *names, check=0)
    assert sorted(result.stdout.split("\n")[:-1]) == sorted(
        f"OK       {n} ({sr.load_recipe(REPO / 'recipes' / (n + '.yaml')).runtime})" for n in names)


def test_verbose_shows_traceback_and_version(cli, tmp_path):
    path = write(tmp_path, "- a\n", "x.yaml")
    assert "Traceback" in cli("-v", "show", path).stderr
    assert cli("--version", check=0).stdout.strip() == f"sparkrun {sr.__version__}"


def test_gpu_mem_flag_range():
    import argparse
    with pytest.raises(sr.UsageError, match="--gpu-mem must be greater than 0 and at most 1"):
        sr.typed_overrides(argparse.Namespace(gpu_mem=1.5, port=None, tp=None, max_model_len=None))


@pytest.mark.parametrize("order", ["explicit first", "explicit last"])
def test_explicit_runtime_config_wins_over_a_top_level_field(tmp_path, order):
    explicit, loose = "runtime_config: {cache_mode: explicit}\n", "cache_mode: loose\n"
    fields = explicit + loose if order == "explicit first" else loose + explicit
    recipe = sr.load_recipe(write(tmp_path, BASE + "command: vllm serve {model}\n" + fields))
    assert recipe.runtime_config == {"cache_mode": "explicit"}


EUGR_EXAMPLE = """\
recipe_version: "1"
name: Qwen3 1.7B (eugr)
model: Qwen/Qwen3-1.7B
runtime: eugr-vllm
container: vllm-node
runtime_config:
  mods: [mods/say-hello]
  build_args: [--tf5]
defaults:
  port: 8000
  host: 0.0.0.0
  tensor_parallel: 2
  gpu_memory_utilization: 0.7
  max_model_len: 32768
  served_model_name: qwen3-1.7b
"""


def test_eugr_example_without_command_gets_the_default_serve_command(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, EUGR_EXAMPLE))
    assert (recipe.mods, recipe.build_args, recipe.runtime) == (["mods/say-hello"], ["--tf5"], "eugr-vllm")
    assert sr.validate_recipe(recipe) == ([], [])
    assert sr.render_command(recipe, sr.recipe_values(recipe, {"port": 9000, "pipeline_parallel": 2})) == (
        "vllm serve Qwen/Qwen3-1.7B --host 0.0.0.0 --port 9000 -tp 2 -pp 2 --gpu-memory-utilization 0.7 "
        "--max-model-len 32768 --served-model-name qwen3-1.7b")


@pytest.mark.parametrize("runtime, expected", [
    ("sglang", "python3 -m sglang.launch_server --model-path org/m --host 0.0.0.0 --port 8000 --tp-size 2 "
               "--mem-fraction-static 0.5 --context-length 4096 --served-model-name m"),
    ("llama-cpp", "llama-server -hf org/m --host 0.0.0.0 --port 8000 --ctx-size 4096 --alias m"),
    ("vllm", "vllm serve org/m --host 0.0.0.0 --port 8000 -tp 2 --gpu-memory-utilization 0.5 "
             "--max-model-len 4096 --served-model-name m"),
])
def test_every_runtime_has_a_default_serve_command(tmp_path, runtime, expected):
    recipe = sr.load_recipe(write(tmp_path, BASE + f"runtime: {runtime}\ndefaults: {{tensor_parallel: 2, "
                                  "gpu_memory_utilization: 0.5, max_model_len: 4096, served_model_name: m}\n"))
    assert sr.render_command(recipe, sr.recipe_values(recipe)) == expected


def test_validate_checks_metadata_hints(tmp_path, cli):
    path = write(tmp_path, BASE + "command: vllm serve {model}\n"
                 "metadata: {model_params: lots, model_dtype: fp7, kv_dtype: bf16}\n", "odd-meta.yaml")
    result = cli("recipe", "validate", path)
    assert result.returncode == 0 and result.stdout.splitlines() == [
        "WARNING  odd-meta: metadata.model_params 'lots' is not a parameter count (like 30B, 1.7B, 235M); "
        "the VRAM estimate ignores it",
        "WARNING  odd-meta: metadata.model_dtype 'fp7' is not a known dtype or quantization; "
        "the VRAM estimate ignores it"]
    path.write_text(BASE + "command: vllm serve {model}\nmetadata: {kv_dtype: e5m9}\n")
    assert "metadata.kv_dtype 'e5m9' is not a known dtype" in cli("recipe", "validate", path).stdout


def test_show_name_is_the_name_field(cli, tmp_path):
    path = write(tmp_path, EUGR_EXAMPLE, "eugr-example.yaml")
    assert cli("show", path, "--no-vram", check=0).stdout.startswith("Name:         Qwen3 1.7B (eugr)\n")
    assert cli("show", path, "--no-vram", "--runtime", "sglang").returncode == 2


def test_node_count_includes_data_parallel(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, BASE + "defaults: {tensor_parallel: 2, data_parallel: 2}\ncommand: x\n"))
    assert sr.node_count(recipe, sr.recipe_values(recipe)) == 4
    plain = sr.load_recipe(write(tmp_path, BASE + "command: vllm serve m\n", "p.yaml"))
    assert sr.node_count(plain, sr.recipe_values(plain), "vllm serve m --data-parallel-size 3") == 3
    assert sr.node_count(plain, sr.recipe_values(plain), "vllm serve m -dp=2") == 2
    with pytest.raises(sr.UsageError, match="'data_parallel' must be a whole number"):
        sr.node_count(plain, sr.recipe_values(plain, {"data_parallel": "two"}))
