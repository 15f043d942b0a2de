"""run -> ready -> status -> logs -> stop on the test bed, for every runtime, and the faults."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import H1, H2, H3, ib_address, REPO

IMAGES = {"vllm": "scitrera/dgx-spark-vllm:0.16.0-t5", "sglang": "scitrera/dgx-spark-sglang:0.5.9-t5",
          "llama": "scitrera/dgx-spark-llama-cpp:b8094-cu131", "eugr": "vllm-node"}


@pytest.fixture
def lab(bed, tmp_path):
    """The bed with the recipes' images on every host (distribution is tested elsewhere)."""
    for image in IMAGES.values():
        bed.bed.add_image(image, size_bytes=4096)
    return bed


def write_recipe(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def run_ok(lab, *args):
    result = lab("run", *map(str, args), "--no-sync", "--no-follow", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_calls(host):
    return [c for c in host.docker_calls() if c[:1] == ["run"]]


def env_of(call):
    return dict(call[i + 1].split("=", 1) for i, a in enumerate(call) if a == "-e")


def everything_stopped(lab):
    for host in lab.bed.hosts:
        assert [c["name"] for c in host.containers() if c["running"]] == []
        deadline = time.monotonic() + 5
        while host.processes_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert host.processes_alive() == []


def lifecycle(lab, recipe, hosts, *extra, port=8000, served="qwen3-1.7b"):
    result = run_ok(lab, recipe, "-H", ",".join(hosts), "--port", port, *extra)
    assert f"Ready: http://{hosts[0]}:{port}/v1  (model: {served})" in result.stdout
    status = json.loads(lab("status", "-H", ",".join(hosts), "--json").stdout)
    (workload,) = status["workloads"]
    assert workload["ready"] is True and workload["endpoint"] == f"http://{hosts[0]}:{port}/v1"
    assert sorted(c["host"] for c in workload["containers"]) == sorted(hosts)
    logs = lab("logs", recipe, "-H", ",".join(hosts), "--no-follow", "--tail", "all")
    assert logs.returncode == 0 and logs.stdout.strip()
    stopped = lab("stop", recipe, "-H", ",".join(hosts))
    assert stopped.returncode == 0 and f"Stopped {len(hosts)} container(s)." in stopped.stdout
    everything_stopped(lab)
    return result


def test_vllm_solo(lab):
    lifecycle(lab, "qwen3-1.7b-vllm", [H1])
    (call,) = run_calls(lab.bed.hosts[0])
    assert call[-3:-1] == ["bash", "-c"] and call[-1].startswith("vllm serve Qwen/Qwen3-1.7B ")
    assert "--nnodes" not in call[-1]
    labels = dict(call[i + 1].split("=", 1) for i, a in enumerate(call) if a == "--label")
    assert labels["sparkrun.recipe"] == "qwen3-1.7b-vllm" and labels["sparkrun.role"] == "head"
    assert {"--network", "host", "--gpus", "all", "--ipc"} <= set(call)


@pytest.mark.parametrize("nodes", [2, 3])
def test_vllm_distributed_multi_node(lab, nodes):
    hosts = [H1, H2, H3][:nodes]
    lifecycle(lab, "qwen3-1.7b-vllm", hosts, "--tp", nodes)
    for rank, host in enumerate(lab.bed.hosts[:nodes]):
        (call,) = run_calls(host)
        command = call[-1]
        assert f"--nnodes {nodes} --node-rank {rank} --master-addr {ib_address(H1)} --master-port 29501" in command
        assert command.endswith("--headless") == (rank > 0)
        env = env_of(call)
        # Each host's own devices, not the head's.
        assert env["NCCL_IB_HCA"] == "roceP2p1s0f1,rocep1s0f1"
        assert env["UCX_NET_DEVICES"] == "roceP2p1s0f1:1,rocep1s0f1:1"
        assert env["NCCL_SOCKET_IFNAME"] == "enP2p1s0f1np1" and env["NCCL_IB_GID_INDEX"] == "3"
        assert env["VLLM_HOST_IP"] == ib_address(host.addr)
        assert "--privileged" in call


def test_per_host_nccl_env_follows_each_hosts_cabling(lab):
    lab.bed.hosts[1].set_ib([{"hca": "mlx5_7", "netdev": "ibp9s0", "ipv4": ib_address(H2), "gid_index": 5}])
    lab.bed.hosts[0].set_ib([{"hca": "rocep1s0f1", "netdev": "enp1s0f1np1", "ipv4": ib_address(H1)}])
    lab.bed.write_addrmaps()
    lifecycle(lab, "qwen3-1.7b-vllm", [H1, H2], "--tp", 2)
    head, worker = (env_of(run_calls(h)[0]) for h in lab.bed.hosts[:2])
    assert (head["NCCL_IB_HCA"], head["NCCL_SOCKET_IFNAME"], head["NCCL_IB_GID_INDEX"]) == ("rocep1s0f1", "enp1s0f1np1", "3")
    assert (worker["NCCL_IB_HCA"], worker["NCCL_SOCKET_IFNAME"], worker["NCCL_IB_GID_INDEX"]) == ("mlx5_7", "ibp9s0", "5")


def test_no_infiniband_means_socket_env_and_management_rendezvous(lab):
    for host in lab.bed.hosts[:2]:
        host.set_ib([])
    result = lifecycle(lab, "qwen3-1.7b-vllm", [H1, H2], "--tp", 2)
    assert "no active InfiniBand/RoCE" in result.stderr
    call = run_calls(lab.bed.hosts[1])[0]
    assert env_of(call)["NCCL_IB_DISABLE"] == "1" and f"--master-addr {H1} " in call[-1]
    assert "--privileged" not in call


def test_vllm_ray(lab, tmp_path):
    recipe = write_recipe(tmp_path, "ray-recipe", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                          "defaults: {served_model_name: qwen3-1.7b, distributed_executor_backend: ray, tensor_parallel: 1}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --host {host} "
                          "--port {port} -tp {tensor_parallel}\n")
    lifecycle(lab, recipe, [H1, H2, H3], "--tp", 3)
    head = run_calls(lab.bed.hosts[0])[0][-1]
    assert "ray start --head --port 46379" in head and "--distributed-executor-backend ray" in head
    assert run_calls(lab.bed.hosts[2])[0][-1] == f"ray start --address {ib_address(H1)}:46379 --node-ip-address {ib_address(H3)} --block"


def test_sglang_solo_and_two_nodes(lab):
    lifecycle(lab, "qwen3-1.7b-sglang", [H1])
    lifecycle(lab, "qwen3-1.7b-sglang", [H2, H3], "--tp", 2)
    assert f"--dist-init-addr {ib_address(H2)}:25000 --nnodes 2 --node-rank 1" in run_calls(lab.bed.hosts[2])[0][-1]


def test_llama_cpp_solo_and_experimental_rpc(lab, tmp_path):
    lifecycle(lab, "qwen3-1.7b-llama-cpp", [H1])
    recipe = write_recipe(tmp_path, "llama-rpc", f"model: Qwen/Qwen3-1.7B-GGUF:Q8_0\nruntime: llama-cpp\n"
                          f"container: {IMAGES['llama']}\ndefaults: {{served_model_name: qwen3-1.7b, tensor_parallel: 2}}\n"
                          "command: llama-server -hf {model} --alias {served_model_name} --host {host} --port {port}\n")
    lifecycle(lab, recipe, [H1, H2], port=8001)
    assert run_calls(lab.bed.hosts[1])[0][-1] == f"rpc-server --host {ib_address(H2)} --port 50052"
    assert run_calls(lab.bed.hosts[0])[-1][-1].endswith(f"--rpc {ib_address(H2)}:50052")


def test_eugr_recipe_with_mods_on_two_nodes(lab, tmp_path):
    (tmp_path / "mods" / "say-hello").mkdir(parents=True)
    (tmp_path / "mods" / "say-hello" / "run.sh").write_text('echo "mod applied in $WORKSPACE_DIR" > /tmp/mod-ran\n')
    recipe = write_recipe(tmp_path, "eugr-two", "recipe_version: '1'\nname: Two\nmodel: Qwen/Qwen3-1.7B\n"
                          "container: vllm-node\ncluster_only: true\nmods: [mods/say-hello]\n"
                          "defaults: {port: 8000, host: 0.0.0.0, tensor_parallel: 2}\n"
                          "command: vllm serve Qwen/Qwen3-1.7B --host {host} --port {port} -tp {tensor_parallel}\n")
    lifecycle(lab, recipe, [H1, H2], served="Qwen/Qwen3-1.7B")
    for host in lab.bed.hosts[:2]:
        assert "mod applied in" in (host.tmp / "mod-ran").read_text()
        assert (host.home / ".cache/sparkrun/mods").is_dir()


def test_missing_mod_fails_before_anything_starts(lab, tmp_path):
    recipe = write_recipe(tmp_path, "eugr-missing", "recipe_version: '1'\nmodel: m/m\ncontainer: vllm-node\n"
                          "mods: [mods/not-there]\ncommand: vllm serve m/m --port {port}\n")
    result = lab("run", recipe, "-H", H1, "--no-sync", "--no-follow")
    assert result.returncode == 2 and "mod(s) not-there not found" in result.stderr
    assert run_calls(lab.bed.hosts[0]) == []


def test_unreachable_host_at_launch(lab):
    lab.bed.hosts[1].down()
    result = lab("run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--no-follow")
    assert result.returncode == 1 and f"{H2}: cannot connect over ssh" in result.stderr
    assert run_calls(lab.bed.hosts[0]) == []


def test_worker_exiting_at_once_removes_everything(lab):
    lab.bed.hosts[1].fault("engine_exit")
    result = lab("run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--no-follow")
    assert result.returncode == 1
    assert "exited before the server was ready" in result.stderr or "exited while waiting" in result.stderr
    assert H2 in result.stderr.splitlines()[-1] or any(l.startswith(f"Error: {H2}") for l in result.stderr.splitlines())
    everything_stopped(lab)
    assert [c for h in lab.bed.hosts[:2] for c in h.containers()] == []


def test_busy_port_is_named_and_auto_port_picks_another(lab):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind((H1, 8000))
        busy.listen(1)
        result = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow")
        assert result.returncode == 1
        assert f"{H1}: port 8000 (serve) is already in use" in result.stderr
        assert run_calls(lab.bed.hosts[0]) == []
        result = run_ok(lab, "qwen3-1.7b-vllm", "-H", H1, "--port", "auto")
        assert f"Ready: http://{H1}:8001/v1" in result.stdout
    lab("stop", "--all", "-H", H1, check=0)


def test_already_running_asks_for_stop_or_replace(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    again = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow")
    assert again.returncode == 1 and "is already running" in again.stderr and "--replace" in again.stderr
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1, "--replace")
    assert len([c for c in lab.bed.hosts[0].containers() if c["running"]]) == 1
    lab("stop", "qwen3-1.7b-vllm", "-H", H1, check=0)
    everything_stopped(lab)


def test_stop_finds_a_run_started_with_port_and_tp(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}", "--port", "9123", "--tp", "2")
    result = lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2},{H3}")
    assert result.returncode == 0 and "Stopped 2 container(s)." in result.stdout
    everything_stopped(lab)


def test_stop_when_nothing_runs(lab):
    result = lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}")
    assert result.returncode == 0
    assert result.stdout.strip() == f"Nothing to stop: no qwen3-1.7b-vllm containers on {H1}, {H2}."


def test_stop_all_and_dry_run(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    run_ok(lab, "qwen3-1.7b-sglang", "-H", H2, "--port", "8100")
    dry = lab("stop", "--all", "-H", f"{H1},{H2}", "--dry-run", check=0)
    assert "would remove" in dry.stdout and all(h.containers() for h in lab.bed.hosts[:2])
    lab("stop", "--all", "-H", f"{H1},{H2}", check=0)
    everything_stopped(lab)


def popen(lab, *args):
    return subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), *map(str, args)], env=lab.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def wait_for_line(stream, needle, timeout=60):
    deadline = time.monotonic() + timeout
    seen = []
    os.set_blocking(stream.fileno(), False)
    while time.monotonic() < deadline:
        line = stream.readline()
        if line:
            seen.append(line)
            if needle in line:
                return "".join(seen)
        else:
            time.sleep(0.05)
    raise AssertionError(f"{needle!r} not seen in: {''.join(seen)}")


def test_ctrl_c_while_following_detaches_and_the_job_keeps_running(lab):
    process = popen(lab, "run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync")
    wait_for_line(process.stdout, "Ready:")
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Detached; the server keeps running." in err and f"sparkrun stop qwen3-1.7b-vllm -H {H1}" in err
    assert [c["running"] for c in lab.bed.hosts[0].containers()] == [True]
    lab("stop", "qwen3-1.7b-vllm", "-H", H1, check=0)


def test_ctrl_c_while_a_two_host_launch_gets_ready_detaches(lab):
    lab.bed.hosts[1].fault("engine_slow_ready", "60")  # the worker: both containers get started
    process = popen(lab, "run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync")
    wait_for_line(process.stderr, "waiting for http://")
    assert all(run_calls(h) for h in lab.bed.hosts[:2])
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Detached; the server keeps running." in err  # every container had started
    assert [c["running"] for h in lab.bed.hosts[:2] for c in h.containers()] == [True, True]
    lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", check=0)
    everything_stopped(lab)


def test_secrets_never_visible(lab, tmp_path):
    recipe = write_recipe(tmp_path, "secretive", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                          "defaults: {served_model_name: qwen3-1.7b}\nenv: {MY_API_KEY: '${LAB_SECRET}'}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --host {host} --port {port}\n")
    secrets = {"HF_TOKEN": "hf_TopSecretToken123", "LAB_SECRET": "lab-secret-value-456"}
    dry = lab("run", recipe, "-H", H1, "--dry-run", env=secrets, check=0)
    result = lab("run", recipe, "-H", H1, "--no-sync", "--no-follow", "-vv", env=secrets, check=0)
    host = lab.bed.hosts[0]
    ps = host.ssh("ps -eo args").stdout
    for value in secrets.values():
        for text in (dry.stdout, dry.stderr, result.stdout, result.stderr, ps, json.dumps(host.docker_calls())):
            assert value not in text
    assert "secret HF_TOKEN=***" in dry.stdout and "secret MY_API_KEY=***" in dry.stdout
    container_env = host.ssh(f"docker exec {host.containers()[0]['name']} sh -c 'echo $HF_TOKEN $MY_API_KEY'").stdout
    assert container_env.split() == list(secrets.values())
    assert list((host.tmp).glob("tmp.*")) == []  # the 0600 env file is gone
    lab("stop", recipe, "-H", H1, check=0)


def test_logs_follows_and_ctrl_c_leaves_the_job_running(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    process = popen(lab, "logs", "qwen3-1.7b-vllm", "-H", H1, "--tail", "5")
    wait_for_line(process.stdout, "Uvicorn running")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "Stopped following; qwen3-1.7b-vllm keeps running." in err
    assert [c["running"] for c in lab.bed.hosts[0].containers()] == [True]
    # The remote `docker logs -f` ended with us: nothing of it is left on the host.
    deadline = time.monotonic() + 5
    while "logs -f" in lab.bed.hosts[0].ssh("ps -eo args").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "logs -f" not in lab.bed.hosts[0].ssh("ps -eo args").stdout
    lab("stop", "qwen3-1.7b-vllm", "-H", H1, check=0)


def test_eugr_example_without_command_runs_with_the_default_serve_command(lab, tmp_path):
    (tmp_path / "mods" / "say-hello").mkdir(parents=True)
    (tmp_path / "mods" / "say-hello" / "run.sh").write_text('echo "mod applied" > /tmp/mod-ran\n')
    recipe = write_recipe(tmp_path, "eugr-example", "recipe_version: '1'\nname: Qwen3 1.7B (eugr)\n"
                          "model: Qwen/Qwen3-1.7B\nruntime: eugr-vllm\ncontainer: vllm-node\n"
                          "runtime_config: {mods: [mods/say-hello], build_args: [--tf5]}\n"
                          "defaults: {port: 8000, host: 0.0.0.0, tensor_parallel: 2, gpu_memory_utilization: 0.7, "
                          "max_model_len: 32768, served_model_name: qwen3-1.7b}\n")
    lifecycle(lab, recipe, [H1, H2])
    head = run_calls(lab.bed.hosts[0])[0][-1]
    assert head.endswith("exec vllm serve Qwen/Qwen3-1.7B --host 0.0.0.0 --port 8000 -tp 2 --gpu-memory-utilization "
                         "0.7 --max-model-len 32768 --served-model-name qwen3-1.7b --distributed-executor-backend ray; }")
    assert all((host.tmp / "mod-ran").is_file() for host in lab.bed.hosts[:2])


def test_a_run_line_is_a_stop_line_and_a_file_launch_answers_to_its_path_and_names(lab, tmp_path):
    recipe = write_recipe(tmp_path, "lab-qwen", f"name: Lab Qwen\nmodel: Qwen/Qwen3-1.7B\nruntime: vllm\n"
                          f"container: {IMAGES['vllm']}\ndefaults: {{served_model_name: qwen3-1.7b}}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --host {host} "
                          "--port {port}\n")
    run_line = [recipe, "-H", f"{H2},{H1}", "--tensor-parallel", "1", "--port", "8010", "--option", "x=1",
                "--no-sync", "--no-follow", "--ready-timeout", "120"]
    result = lab("run", *run_line, timeout=180)
    assert result.returncode == 0, result.stderr
    for name in (recipe, "lab-qwen", "Lab Qwen"):
        logs = lab("logs", name, *run_line[1:], "--tail", "all")
        assert logs.returncode == 0 and "Uvicorn running" in logs.stdout, (name, logs.stderr)
    elsewhere = lab("logs", "Lab Qwen", "-H", f"{H1},{H2}", "--tp", "1", "--no-follow")
    assert elsewhere.returncode == 1 and f"no running Lab Qwen on {H1};" in elsewhere.stderr
    stopped = lab("stop", "Lab Qwen", *run_line[1:])
    assert stopped.returncode == 0 and "Stopped 1 container(s)." in stopped.stdout, stopped.stderr
    everything_stopped(lab)


def test_readiness_timeout_prints_the_last_log_lines_and_leaves_nothing(lab):
    lab.bed.hosts[0].fault("engine_slow_ready", "60")
    result = lab("run", "qwen3-1.7b-vllm", "-H", H1, "--no-sync", "--no-follow", "--ready-timeout", "2")
    assert result.returncode == 1
    assert f"Error: {H1}: not ready after 2 s (" in result.stderr and "last log lines of the head:" in result.stderr
    assert "vLLM API server version" in result.stderr and "sparkrun logs" not in result.stderr
    assert lab.bed.hosts[0].containers() == []
    everything_stopped(lab)
