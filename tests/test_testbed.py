"""Self-tests of the simulated-host test bed (tests/testbed)."""
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BED_OCTET  # noqa: E402
from testbed import TestBed, facts  # noqa: E402

IMAGE = "vllm/vllm-openai:v0.11.0"
RUN = "docker run -d --network host --gpus all --ipc host"


@pytest.fixture(scope="session")
def bed(tmp_path_factory):
    # Own addresses, above the conftest-level bed's (BED_OCTET..+2) and inside this run's range,
    # so that both can run alongside and next to other runs on the machine.
    bed = TestBed(tmp_path_factory.mktemp("selftest-bed"), n_hosts=3, first_octet=BED_OCTET + 5).start()
    yield bed
    bed.stop()


@pytest.fixture(autouse=True)
def fresh(bed):
    bed.add_image(IMAGE, size_bytes=4096)
    yield
    bed.reset(images=True)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_hosts_have_identity_and_env(bed):
    for host in bed.hosts:
        out = ok(host.ssh('echo "$TESTBED_HOST_ID $(hostname) $TESTBED_HOST_ADDR"; '
                          "command -v docker; echo $SPARKRUN_SYSFS"))
        lines = out.splitlines()
        assert lines[0] == f"{host.id} {host.id} {host.addr}"
        assert lines[1] == str(host.bin / "docker")
        assert lines[2] == str(host.root / "sysfs")


def test_home_and_tmp_are_private(bed):
    h1, h2 = bed.hosts[:2]
    ok(h1.ssh("echo one > ~/marker && echo t > /tmp/marker"))
    assert (h1.home / "marker").read_text() == "one\n"
    assert h1.path("/tmp/marker").exists()
    assert h2.ssh("test -e ~/marker || test -e /tmp/marker").returncode == 1


def test_controlmaster_reuses_one_connection(bed):
    host = bed.hosts[0]
    host.reset_connections()
    opts = ("-o", "ControlMaster=auto", "-o", f"ControlPath={bed.control_home}/cm-%C",
            "-o", "ControlPersist=10")
    for i in range(3):
        assert ok(host.ssh(f"echo {i}", options=opts)) == f"{i}\n"
    assert host.connection_count() == 1
    bed.close_client_masters()
    ok(host.ssh("true", options=opts))
    assert host.connection_count() == 2


def test_docker_run_ps_logs_rm(bed):
    host = bed.hosts[0]
    cid = ok(host.ssh(f"{RUN} --name srv --label sparkrun.job=j1 -e HF_TOKEN=hf_secret "
                      f"{IMAGE} vllm serve Qwen/Qwen3-0.6B --host 0.0.0.0 --port 18010 "
                      "--served-model-name qwen")).strip()
    assert len(cid) == 64
    models = host.wait_http(18010)
    assert models["data"][0]["id"] == "qwen"
    rows = [json.loads(line) for line in ok(host.ssh(
        "docker ps --filter label=sparkrun.job=j1 --format '{{json .}}'")).splitlines()]
    assert [(r["Names"], r["State"], r["Labels"]) for r in rows] == \
        [("srv", "running", "sparkrun.job=j1")]
    assert ok(host.ssh("docker inspect --format '{{.State.Running}}' srv")) == "true\n"
    env = json.loads(ok(host.ssh("docker inspect --format '{{json .Config.Env}}' srv")))
    assert env == ["HF_TOKEN=***"]
    assert "Uvicorn running on http://0.0.0.0:18010" in ok(host.ssh("docker logs srv"))
    assert host.processes_alive()
    assert ok(host.ssh("docker rm -f srv")) == "srv\n"
    assert host.processes_alive() == []
    assert host.containers() == []
    assert [c[0] for c in host.docker_calls()] == ["run", "ps", "inspect", "inspect", "logs", "rm"]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{host.addr}:18010/health", timeout=2)


def test_completions_and_exec(bed):
    host = bed.hosts[1]
    ok(host.ssh(f"echo 'HF_TOKEN=tok123' > /tmp/env && {RUN} --name gen --env-file /tmp/env "
                f"{IMAGE} vllm serve m1 --port 18020"))
    host.wait_http(18020)
    request = urllib.request.Request(
        f"http://{host.addr}:18020/v1/chat/completions", method="POST",
        data=json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=5).read())
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert ok(host.ssh("docker exec gen sh -c 'echo $HF_TOKEN'")) == "tok123\n"
    assert "tok123" not in (host.root / "docker").joinpath("calls.jsonl").read_text()


def test_two_node_vllm_reaches_ready(bed):
    head, worker = bed.hosts[:2]
    master = head.ib()[0]["ipv4"]  # a loopback stand-in for an IB address
    common = f"vllm serve big --nnodes 2 --master-addr {master} --master-port 18031"
    ok(head.ssh(f"{RUN} --name head {IMAGE} {common} --node-rank 0 --port 18030"))
    time.sleep(0.3)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{head.addr}:18030/v1/models", timeout=1)
    ok(worker.ssh(f"{RUN} --name worker {IMAGE} {common} --node-rank 1 --headless"))
    assert head.wait_http(18030)["data"][0]["id"] == "big"
    assert worker.containers()[0]["running"]
    ok(head.ssh("docker rm -f head"))
    deadline = time.monotonic() + 5
    while worker.containers()[0]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.containers()[0]["exit_code"] == 1


def test_ray_cluster_and_llama_rpc(bed):
    h1, h2 = bed.hosts[:2]
    ok(h1.ssh(f"{RUN} --name rayhead {IMAGE} ray start --head --port 18040 --block"))
    ok(h2.ssh(f"{RUN} --name rayw {IMAGE} ray start --address {h1.addr}:18040 --block"))
    deadline = time.monotonic() + 10
    while ok(h1.ssh("docker exec rayhead ray status")).count(" 1 node_") != 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ok(h2.ssh(f"{RUN} --name rpc {IMAGE} rpc-server --host 0.0.0.0 --port 18041"))
    ok(h1.ssh(f"{RUN} --name llama {IMAGE} llama-server -hf org/model:Q4 --alias small "
              f"--host 0.0.0.0 --port 18042 --rpc {h2.addr}:18041"))
    assert h1.wait_http(18042)["data"][0]["id"] == "small"


def test_llama_server_exits_when_its_draft_model_file_is_missing(bed):
    host = bed.hosts[0]
    ok(host.ssh(f"{RUN} --name spec {IMAGE} llama-server -hf org/model:Q4 -md /models/missing.gguf --port 18043"))
    deadline = time.monotonic() + 10
    while host.containers()[0]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.containers()[0]["exit_code"] == 1
    logs = host.ssh("docker logs spec")
    assert "srv    load_model: failed to load draft model, '/models/missing.gguf'" in logs.stdout + logs.stderr
    ok(host.ssh(f"{RUN} --name spec2 {IMAGE} llama-server -hf org/model:Q4 -hfd org/draft:Q4 --port 18044"))
    assert host.wait_http(18044)["data"][0]["id"].endswith("org_model_q4.gguf")


def test_save_load_between_hosts_keeps_image_id(bed):
    h1, h2, h3 = bed.hosts
    image_id = h1.add_image("local/only:1", size_bytes=100_000)
    assert h2.ssh("docker image inspect local/only:1").returncode == 1
    save = subprocess.Popen(bed.ssh_command(1) + ["docker save local/only:1"],
                            stdout=subprocess.PIPE, env=bed.client_env())
    load = subprocess.run(bed.ssh_command(2) + ["docker load"], stdin=save.stdout,
                          capture_output=True, text=True, env=bed.client_env())
    save.stdout.close()
    assert save.wait() == 0 and load.returncode == 0, load.stderr
    assert load.stdout == "Loaded image: local/only:1\n"
    assert ok(h2.ssh("docker image inspect --format '{{.Id}}' local/only:1")).strip() == image_id
    pulled = h3.ssh("docker pull local/only:1")
    assert pulled.returncode == 1 and "registry-1.docker.io" in pulled.stderr
    h3.add_registry_image("local/only:1", size_bytes=100_000)
    ok(h3.ssh("docker pull local/only:1"))
    assert h3.images()[0]["id"] == image_id


def test_fake_ib_facts(bed):
    h1, h2 = bed.hosts[:2]
    out = ok(h1.ssh("cat $SPARKRUN_SYSFS/class/infiniband/*/ports/1/state"))
    assert out == "4: ACTIVE\n4: ACTIVE\n"
    gid = ok(h1.ssh("cat $SPARKRUN_SYSFS/class/infiniband/rocep1s0f1/ports/1/gids/3 "
                    "$SPARKRUN_SYSFS/class/infiniband/rocep1s0f1/ports/1/gid_attrs/types/3 "
                    "$SPARKRUN_SYSFS/class/net/enp1s0f1np1/device/vendor; "
                    "ls $SPARKRUN_SYSFS/class/infiniband/rocep1s0f1/device/net"))
    assert gid.split("\n") == [f"0000:0000:0000:0000:0000:ffff:7f0a:0a{BED_OCTET + 5:02x}", "RoCE v2",
                               "0x15b3", "enp1s0f1np1", ""]
    h2.set_ib([{"hca": "mlx5_0", "netdev": "ib0x", "ipv4": "10.20.0.2", "gid_index": 1}])
    assert ok(h2.ssh("ls $SPARKRUN_SYSFS/class/infiniband")) == "mlx5_0\n"
    assert "inet 10.20.0.2/24" in ok(h2.ssh("ip -o -4 addr show dev ib0x"))
    addrs = json.loads(ok(h2.ssh("ip -j -4 addr show")))
    assert [a["ifname"] for a in addrs] == ["lo", "enP7s7", "ib0x"]
    h2.set_ib([])
    assert ok(h2.ssh("ls $SPARKRUN_SYSFS/class/infiniband | wc -l")).strip() == "0"
    # A GB10's memory is the host's: no GPU total, but each process's share, and MemAvailable
    # without what the processes hold.
    assert ok(h1.ssh("nvidia-smi --query-gpu=name,memory.total --format=csv,noheader")) == \
        "NVIDIA GB10, [N/A]\n"
    assert ok(h1.ssh("nvidia-smi --query-compute-apps=pid,process_name,used_memory "
                     "--format=csv,noheader,nounits")) == ""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (h1.root / "gpu_processes").mkdir(exist_ok=True)
        (h1.root / "gpu_processes" / str(holder.pid)).write_text("20000 python3\n")
        assert ok(h1.ssh("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv")) == \
            f"pid, process_name, used_memory [MiB]\n{holder.pid}, python3, 20000 MiB\n"
        assert "MemAvailable:   101520000 kB" in ok(h1.ssh("cat $SPARKRUN_MEMINFO"))
        h1.set_gpu(unified_memory=False)  # a discrete GPU's memory is its own
        assert ok(h1.ssh("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits")) == \
            f"{holder.pid}, 20000\n"
        assert "MemAvailable:   122000000 kB" in ok(h1.ssh("cat $SPARKRUN_MEMINFO"))
        h1.set_gpu()
    finally:
        holder.kill()
        holder.wait()
    ok(h1.ssh("nvidia-smi --query-compute-apps=pid --format=csv,noheader"))
    assert "MemAvailable:   122000000 kB" in ok(h1.ssh("cat $SPARKRUN_MEMINFO"))
    h1.set_gpu(memory_mib=81920, unified_memory=False)
    assert ok(h1.ssh("nvidia-smi --query-gpu=name,memory.total --format=csv,noheader")) == "NVIDIA GB10, 81920 MiB\n"
    h1.set_gpu()


def test_down_and_up(bed):
    host = bed.hosts[2]
    host.down()
    assert host.ssh("true", options=("-o", "ConnectTimeout=2")).returncode == 255
    host.up()
    assert ok(host.ssh("echo back")) == "back\n"


def test_faults(bed):
    h1, h2, h3 = bed.hosts
    h1.fault("docker_permission")
    denied = h1.ssh("docker ps")
    assert denied.returncode == 1 and "permission denied" in denied.stderr
    h2.fault("engine_exit")
    ok(h2.ssh(f"{RUN} --name dies {IMAGE} vllm serve m --port 18060"))
    deadline = time.monotonic() + 5
    while h2.containers()[0]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    status = ok(h2.ssh("docker ps -a --format '{{.Status}}'"))
    assert status.startswith("Exited (1)")
    h3.fault("docker_run_fail", "custom failure")
    failed = h3.ssh(f"{RUN} {IMAGE} vllm serve m")
    assert failed.returncode == 125 and "custom failure" in failed.stderr


def test_docker_errors_look_like_docker(bed):
    host = bed.hosts[0]
    bad = host.ssh("docker ps --bogus")
    assert bad.returncode == 125 and bad.stderr.startswith("unknown flag: --bogus")
    missing = host.ssh("docker inspect nothing")
    assert missing.returncode == 1 and "Error: No such object: nothing" in missing.stderr
    noimage = host.ssh("docker run -d no/such:image")
    assert noimage.returncode == 125
    assert "Unable to find image 'no/such:image' locally" in noimage.stderr
    ok(host.ssh(f"{RUN} --name same {IMAGE} sleep 30"))
    clash = host.ssh(f"{RUN} --name same {IMAGE} sleep 30")
    assert clash.returncode == 125 and "is already in use" in clash.stderr


def test_spark_ports_are_twins_with_one_address(bed):
    host = bed.hosts[0]
    host.set_ib(facts.spark_ports({1: "127.10.12.9"}))
    try:
        states = ok(host.ssh("cd $SPARKRUN_SYSFS/class/infiniband && for d in *; do "
                             "echo $d $(cat $d/ports/1/state) $(basename $(readlink -f $d/device)); done"))
        assert states.splitlines() == ["roceP2p1s0f0 1: DOWN 0002:01:00.0", "roceP2p1s0f1 4: ACTIVE 0002:01:00.1",
                                       "rocep1s0f0 1: DOWN 0000:01:00.0", "rocep1s0f1 4: ACTIVE 0000:01:00.1"]
        addresses = json.loads(ok(host.ssh("ip -j -4 addr show")))
        assert [(a["ifname"], a["addr_info"][0]["local"]) for a in addresses if a["addr_info"]][2:] == \
            [("enp1s0f1np1", "127.10.12.9")]
    finally:
        host.set_ib()
