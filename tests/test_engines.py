"""Real engines and images: served names, readiness, API keys, ENTRYPOINTs, and what a signal does
at each phase of a launch. Plan-level checks first, then end to end on the test bed."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import sparkrun as sr
from conftest import CORPUS, H1, H2, REPO
from test_lifecycle import IMAGES, everything_stopped, run_calls, wait_for_line, write_recipe

HOSTS = (H1, H2)
NVIDIA_ENTRYPOINT = ["/opt/nvidia/nvidia_entrypoint.sh"]
# Official images whose ENTRYPOINT takes the container's arguments as its own:
# vllm/vllm-openai (docker/Dockerfile: ENTRYPOINT ["vllm", "serve"]) and ggml's llama.cpp
# server images (.devops/cuda.Dockerfile: ENTRYPOINT [ "/app/llama-server" ]).
VLLM_OPENAI = "vllm/vllm-openai:v0.11.0"
GGML_SERVER = "ghcr.io/ggml-org/llama.cpp:server-cuda"
CONSUMING = {VLLM_OPENAI: ["vllm", "serve"], GGML_SERVER: ["/app/llama-server"]}
# Custom images whose ENTRYPOINT is a script of either kind (the inspect data cannot tell).
SCRIPTED = {"lab/vllm-launcher:1": ["/usr/local/bin/serve.sh"], "lab/vllm-wrapped:1": ["/usr/local/bin/setup-env.sh"]}
CORPUS_LLAMA = sorted(p for p in CORPUS.rglob("*.yaml") if "llama-server" in p.read_text() and "command" in p.read_text())


def plan_of(tmp_path, text, nodes=1, overrides=None, facts=None, environ=None):
    recipe = sr.load_recipe(write_recipe(tmp_path, "r", text))
    selection = sr.HostSelection(HOSTS[:nodes], None, "test")
    options = sr.LaunchOptions(overrides=dict(overrides or {}, tensor_parallel=nodes))
    return sr.plan_launch(recipe, selection, options, facts, environ=environ or {})


# -- served names ------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime, command, flag", [
    ("vllm", "vllm serve {model} --port {port}", "--served-model-name"),
    ("sglang", "python3 -m sglang.launch_server --model-path {model} --port {port}", "--served-model-name"),
    ("llama-cpp", "llama-server -hf {model} --port {port}", "--alias"),
])
def test_served_name_flag_is_appended_per_engine(tmp_path, runtime, command, flag):
    plan = plan_of(tmp_path, f"model: org/m\nruntime: {runtime}\ncontainer: img:1\n"
                             f"defaults: {{served_model_name: short}}\ncommand: {command}\n")
    head = plan.head_container
    assert f" {flag} short" in head.command and plan.served_model == "short"
    assert dict(head.labels)["sparkrun.served_model"] == "short"
    assert "(served as short)" in plan.describe()


@pytest.mark.parametrize("runtime, command, served", [
    # the flag's value in the rendered command wins over served_model_name
    ("vllm", "vllm serve {model} --served-model-name=literal", "literal"),
    ("llama-cpp", "llama-server -m /models/m.gguf -a literal", "literal"),
    # no flag, no served_model_name: what the engine serves by default
    ("vllm", "vllm serve {model} --port {port}", "org/m"),
    ("sglang", "python3 -m sglang.launch_server --model-path /local/m", "/local/m"),
    ("llama-cpp", "llama-server -m /models/m.gguf", "/models/m.gguf"),
    ("llama-cpp", "llama-server -hf {model}", ""),  # only the running llama-server knows its file
])
def test_the_name_the_engine_really_serves(tmp_path, runtime, command, served):
    defaults = "defaults: {served_model_name: other}\n" if "literal" in command else ""
    plan = plan_of(tmp_path, f"model: org/m\nruntime: {runtime}\ncontainer: img:1\n{defaults}command: {command}\n")
    assert plan.served_model == served
    assert plan.head_container.command.count("--served-model-name") + plan.head_container.command.count("--alias") \
        <= (1 if "literal" in command else 0)


def test_api_key_from_the_command_or_the_engine_variable_never_shown(tmp_path):
    plan = plan_of(tmp_path, "model: org/m\nruntime: vllm\ncontainer: img:1\n"
                             "command: vllm serve {model} --api-key sk-in-command-123\n")
    assert plan.api_key == "sk-in-command-123"
    assert "sk-in-command-123" not in sr.mask(plan.describe()) and "API key:     ***" in plan.describe()
    plan = plan_of(tmp_path, "model: org/m\nruntime: vllm\ncontainer: img:1\nenv: {VLLM_API_KEY: '${KEY}'}\n"
                             "command: vllm serve {model}\n", environ={"KEY": "sk-from-env-456"})
    assert plan.api_key == "sk-from-env-456"
    banner = sr.ready_banner(plan.replace(served_model="org/m"))
    assert "-H 'Authorization: Bearer ***'" in banner and "sk-from-env" not in banner


def test_eugr_recipes_drop_the_ray_backend_when_solo():
    path = CORPUS / "eugr-spark-vllm-docker" / "recipes" / "gemma4-26b-a4b.yaml"
    recipe = sr.load_recipe(path)
    solo = sr.plan_launch(recipe, sr.HostSelection(HOSTS[:1], None, "t"), sr.LaunchOptions(overrides={}, solo=True))
    assert "--distributed-executor-backend" not in solo.head_container.command
    pair = sr.plan_launch(recipe, sr.HostSelection(HOSTS, None, "t"), sr.LaunchOptions(overrides={"tensor_parallel": 2}))
    assert pair.head_container.command.count("--distributed-executor-backend ray") == 1


# -- entrypoints -------------------------------------------------------------------------------

def image_facts(image, entrypoint):
    return {h: sr.HostFacts(h, images=((image, f"sha256:ab|arm64|[]|[]||{json.dumps(entrypoint)}"),)) for h in HOSTS}


@pytest.mark.parametrize("entrypoint, chosen", [
    (None, None), (NVIDIA_ENTRYPOINT, None), (["/usr/bin/tini", "--"], None), (["docker-entrypoint.sh"], None),
    (["vllm", "serve"], ""), (["/app/llama-server"], ""), (["python3", "-m", "sglang.launch_server"], ""),
    (["/usr/local/bin/start.sh"], None),  # kept until the check on the head says otherwise
])
def test_entrypoint_kept_when_it_passes_arguments_on_else_cleared(tmp_path, entrypoint, chosen):
    plan = plan_of(tmp_path, "model: org/m\nruntime: vllm\ncontainer: img:1\ncommand: vllm serve {model}\n",
                   facts=image_facts("img:1", entrypoint))
    spec = plan.head_container
    assert spec.entrypoint == chosen
    argv = spec.docker_run_argv()
    assert argv[-4:] == ["img:1", "bash", "-c", spec.command]
    assert (argv[-6:-4] == ["--entrypoint", ""]) == (chosen == "")


@pytest.mark.parametrize("passes, chosen", [(True, None), (False, "")])
def test_a_script_entrypoint_follows_the_check_on_the_host(tmp_path, passes, chosen):
    text = "model: org/m\nruntime: vllm\ncontainer: img:1\ncommand: vllm serve {model}\n"
    facts = image_facts("img:1", ["/usr/local/bin/start.sh"])
    recipe = sr.load_recipe(write_recipe(tmp_path, "r", text))
    assert sr.entrypoint_needs_check(recipe, "img:1", facts, HOSTS)
    assert not sr.entrypoint_needs_check(recipe, "img:1", image_facts("img:1", NVIDIA_ENTRYPOINT), HOSTS)
    facts[H1] = facts[H1].replace(entrypoint_checks=(("img:1", passes),))
    assert not sr.entrypoint_needs_check(recipe, "img:1", facts, HOSTS)
    assert plan_of(tmp_path, text, facts=facts).head_container.entrypoint == chosen


def test_recipe_entrypoint_overrides_the_image(tmp_path):
    text = "model: org/m\nruntime: vllm\ncontainer: img:1\nentrypoint: {}\ncommand: vllm serve {{model}}\n"
    plan = plan_of(tmp_path, text.format("''"), facts=image_facts("img:1", NVIDIA_ENTRYPOINT))
    assert plan.head_container.entrypoint == "" and "(the recipe's entrypoint)" in plan.describe()
    plan = plan_of(tmp_path, text.format("/opt/nvidia/nvidia_entrypoint.sh"), facts=image_facts("img:1", ["vllm", "serve"]))
    assert plan.head_container.docker_run_argv()[-6:-4] == ["--entrypoint", "/opt/nvidia/nvidia_entrypoint.sh"]


def test_probe_reads_the_image_entrypoint():
    output = ("@@images\nimg:1\tsha256:ab|arm64|[]|[]|2026-11-20T04:12:09Z|[\"vllm\",\"serve\"]\nother:2\t\n"
              "plain:3\tsha256:cd|arm64|[]|[]||null\n@@end\n")
    facts = sr.parse_probe(H1, output)
    assert facts.image_config("img:1") == ["vllm", "serve"] and facts.image_id("img:1") == "sha256:ab"
    assert facts.image_config("other:2") is None and facts.image_config("plain:3") == []
    assert facts.image_info("img:1").describe() == "ab, created 2026-11-20 04:12 UTC"


# -- end to end ------------------------------------------------------------------------------

@pytest.fixture
def lab(bed):
    """The bed with NGC-based recipe images (NVIDIA's pass-through entrypoint) and official
    images whose ENTRYPOINT consumes the arguments, on every host."""
    for image in IMAGES.values():
        bed.bed.add_image(image, size_bytes=4096, entrypoint=NVIDIA_ENTRYPOINT)
    for image, entrypoint in {**CONSUMING, **SCRIPTED}.items():
        bed.bed.add_image(image, size_bytes=4096, entrypoint=entrypoint, cmd=[])
    return bed


def run(lab, *args, timeout=180):
    return lab("run", *map(str, args), "--no-sync", "--no-follow", timeout=timeout)


def head_log(lab):
    host = lab.bed.hosts[0]
    return host.container_log(host.containers()[0]["name"])


def test_served_name_is_appended_and_probed_end_to_end(lab, tmp_path):
    recipe = write_recipe(tmp_path, "named", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                          "defaults: {served_model_name: short-name}\ncommand: vllm serve {model} --port {port}\n")
    result = run(lab, recipe, "-H", H1)
    assert result.returncode == 0, result.stderr
    assert f"Ready: http://{H1}:8000/v1  (model: short-name)" in result.stdout
    assert run_calls(lab.bed.hosts[0])[0][-1].endswith("--served-model-name short-name")
    assert lab.bed.hosts[0].wait_http(8000)["data"][0]["id"] == "short-name"
    lab("stop", "--all", "-H", H1, check=0)


@pytest.mark.parametrize("path", CORPUS_LLAMA, ids=lambda p: p.stem)
def test_corpus_llama_cpp_recipes_reach_ready_solo(lab, path):
    image = sr.load_recipe(path).container
    lab.bed.add_image(image, size_bytes=4096, hosts=[1], entrypoint=NVIDIA_ENTRYPOINT)
    started = time.monotonic()
    result = run(lab, path, "-H", H1, "--solo", "--ready-timeout", "60")
    assert result.returncode == 0, result.stderr
    listed = lab.bed.hosts[0].wait_http(8000)["data"][0]["id"]
    assert listed.startswith("/root/.cache/llama.cpp/") and listed.endswith(".gguf")  # no --alias: its file
    assert f"(model: {listed})" in result.stdout and time.monotonic() - started < 60
    lab("stop", "--all", "-H", H1, check=0)
    everything_stopped(lab)


def test_a_server_listing_another_name_fails_within_seconds(lab, tmp_path):
    # The shell inside the container expands $NAME: the engine serves a name sparkrun cannot see.
    recipe = write_recipe(tmp_path, "elsewhere", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                          "env: {NAME: qwen-elsewhere}\ncommand: vllm serve {model} --served-model-name $NAME --port {port}\n")
    started = time.monotonic()
    result = run(lab, recipe, "-H", H1)
    assert result.returncode == 1 and time.monotonic() - started < 30
    assert f"Error: {H1}: http://{H1}:8000/v1/models lists qwen-elsewhere, never $NAME" in result.stderr
    assert lab.bed.hosts[0].containers() == []


@pytest.mark.parametrize("engine", ["vllm", "llama"])
def test_api_key_is_sent_as_bearer_and_masked(lab, tmp_path, engine):
    if engine == "vllm":  # the key in the engine's variable, from this machine's environment
        text = (f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\nenv: {{VLLM_API_KEY: '${{LAB_KEY}}'}}\n"
                "defaults: {served_model_name: qwen3-1.7b}\ncommand: vllm serve {model} --port {port}\n")
    else:  # the key on the command line
        text = (f"model: Qwen/Qwen3-1.7B-GGUF:Q8_0\nruntime: llama-cpp\ncontainer: {IMAGES['llama']}\n"
                "defaults: {served_model_name: qwen3-1.7b}\n"
                "command: llama-server -hf {model} --host 0.0.0.0 --port {port} --api-key sk-lab-secret-789\n")
    key = "sk-lab-secret-789"
    result = lab("run", write_recipe(tmp_path, engine, text), "-H", H1, "--no-sync", "--no-follow",
                 env={"LAB_KEY": key}, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "-H 'Authorization: Bearer ***'" in result.stdout
    assert key not in result.stdout + result.stderr
    with pytest.raises(urllib.error.HTTPError) as refused:  # the stand-in demands the key, as the engine does
        urllib.request.urlopen(f"http://{H1}:8000/v1/models", timeout=5)
    assert refused.value.code == 401
    lab("stop", "--all", "-H", H1, check=0)


def test_endpoint_reachable_only_from_the_head_is_probed_through_ssh(lab):
    # spark-1 is a name only ssh knows (the bed's ssh_config); this machine cannot resolve it.
    result = run(lab, "qwen3-1.7b-vllm", "-H", "spark-1")
    assert result.returncode == 0, result.stderr
    assert "http://spark-1:8000/v1 does not answer from this machine but does on spark-1" in result.stderr
    assert f"ssh -N -L 8000:{H1}:8000 spark-1   # then use http://localhost:8000/v1" in result.stdout
    lab("stop", "--all", "-H", "spark-1", check=0)


@pytest.mark.parametrize("image", [VLLM_OPENAI, IMAGES["vllm"]])
def test_images_of_both_entrypoint_kinds_serve(lab, image):
    result = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--image", image)
    assert result.returncode == 0, result.stderr
    (call,) = run_calls(lab.bed.hosts[0])
    consuming = image == VLLM_OPENAI
    assert (call[call.index(image) - 2:call.index(image)] == ["--entrypoint", ""]) == consuming
    assert ("== CUDA ==" in head_log(lab)) != consuming  # NVIDIA's wrapper ran its setup, then the command
    lab("stop", "--all", "-H", H1, check=0)


@pytest.mark.parametrize("image, kept", [("lab/vllm-launcher:1", False), ("lab/vllm-wrapped:1", True)])
def test_a_script_entrypoint_is_checked_on_the_head_then_kept_or_cleared(lab, image, kept):
    result = run(lab, "qwen3-1.7b-vllm", "-H", H1, "--image", image)
    assert result.returncode == 0, result.stderr
    check, launch = run_calls(lab.bed.hosts[0])
    assert check[1:3] == ["--rm", "--name"] and "none" in check and check[-3:-1] == ["bash", "-c"]
    assert ("--entrypoint" not in launch) == kept
    assert ("setup-env: environment ready" in head_log(lab)) == kept
    lab("stop", "--all", "-H", H1, check=0)


@pytest.mark.parametrize("image, error", [
    (VLLM_OPENAI, "vllm serve: error: unrecognized arguments: -c"),
    (GGML_SERVER, "error: invalid argument: bash"),
])
def test_docker_stand_in_runs_entrypoint_plus_arguments(lab, image, error):
    host = lab.bed.hosts[0]
    done = host.ssh(f"docker run --name plain {image} bash -c 'echo hello'", timeout=30)
    assert error in done.stdout + done.stderr and done.returncode != 0
    done = host.ssh(f"docker run --rm --entrypoint '' {image} bash -c 'echo hello'", timeout=30)
    assert done.stdout.strip() == "hello"


def test_a_launch_that_cannot_start_names_the_entrypoint(lab, tmp_path):
    recipe = write_recipe(tmp_path, "bad-entry", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {VLLM_OPENAI}\n"
                          "entrypoint: vllm\ncommand: vllm serve {model} --port {port}\n")
    result = run(lab, recipe, "-H", H1)
    assert result.returncode == 1 and "exited" in result.stderr
    assert "(entrypoint: vllm (the recipe's entrypoint))" in result.stderr


# -- signals -----------------------------------------------------------------------------------

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


def start_run(lab, *args):
    """sparkrun run in its own process group, like a job started from a terminal."""
    return subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), "run", *map(str, args)], env=lab.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def deliver(process, signum):
    """Ctrl+C and a closed terminal signal the whole foreground process group; `kill` just us."""
    if signum == signal.SIGTERM:
        process.send_signal(signum)
    else:
        os.killpg(process.pid, signum)


def wait_for_call(host, subcommand, timeout=30):
    deadline = time.monotonic() + timeout
    while not any(c[:1] == [subcommand] for c in host.docker_calls()):
        assert time.monotonic() < deadline, f"no docker {subcommand} on {host.id}"
        time.sleep(0.05)


# phase -> (fault to set up on host 2, how to know the phase has come, whether the job survives)
PHASES = {
    "probe": (("docker_slow", "ps 4"), lambda lab, p: wait_for_call(lab.bed.hosts[1], "ps"), False),
    "distribution": (("docker_slow", "load 4"), lambda lab, p: wait_for_call(lab.bed.hosts[1], "load"), False),
    "start in flight": (("docker_slow", "run 3"), lambda lab, p: wait_for_call(lab.bed.hosts[1], "run"), False),
    "readiness wait": (("engine_slow_ready", "60"), lambda lab, p: wait_for_line(p.stderr, "waiting for http://"), True),
    "log follow": (None, lambda lab, p: wait_for_line(p.stdout, "Ready:"), True),
}


@pytest.mark.parametrize("name", SIGNALS)
@pytest.mark.parametrize("phase", PHASES)
def test_signal_at_each_phase_of_a_two_node_launch(lab, phase, name):
    fault, reached, survives = PHASES[phase]
    if phase == "distribution":  # host 2 lacks the image: it is streamed there from host 1
        lab.bed.hosts[1].ssh(f"docker rmi -f {IMAGES['vllm']}", check=True)
    if fault:
        lab.bed.hosts[1].fault(*fault)
    process = start_run(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync")
    reached(lab, process)
    deliver(process, SIGNALS[name])
    out, err = process.communicate(timeout=90)
    assert process.returncode == 128 + SIGNALS[name], err
    running = [[c["running"] for c in h.containers()] for h in lab.bed.hosts[:2]]
    if survives:
        assert running == [[True], [True]]
        assert "Detached; the server keeps running." in err
        assert f"Follow:    sparkrun logs qwen3-1.7b-vllm -H {H1},{H2}" in err
        assert f"Stop:      sparkrun stop qwen3-1.7b-vllm -H {H1},{H2}" in err
        lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", check=0)
    else:
        assert running == [[], []]
        if phase == "start in flight":
            assert "container start(s) in flight" in err, err
            assert "nothing was left running" in err
    everything_stopped(lab)


def test_foreground_job_ends_with_the_command(lab):
    process = start_run(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--foreground")
    wait_for_line(process.stdout, "Ready:")
    assert [len(h.containers()) for h in lab.bed.hosts[:2]] == [1, 1]
    deliver(process, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Stopping qwen3-1.7b-vllm" in err
    assert [h.containers() for h in lab.bed.hosts[:2]] == [[], []]
    everything_stopped(lab)
    assert lab("run", "qwen3-1.7b-vllm", "-H", H1, "--foreground", "--no-follow").returncode == 2
