"""Multi-node launches on Spark-like networks: twin RoCE devices, hosts cabled differently,
offline labs, data parallel, a three-node ring. Each container's environment is read on its host."""

import json
import re
import shutil

import pytest

import sparkrun
from conftest import H1, H2, H3, TESTS
from test_lifecycle import IMAGES, everything_stopped, lifecycle, run_calls, run_ok, write_recipe
from testbed import facts

lab_setup = sparkrun.command_module("lab_setup")
vllm_distributed = sparkrun.load_runtime("vllm-distributed")

LINK = "127.10.12"  # the subnet of the cable between two hosts


@pytest.fixture
def lab(bed):
    for image in IMAGES.values():
        bed.bed.add_image(image, size_bytes=4096)
    return bed


def octet(host: str) -> str:
    return host.rsplit(".", 1)[1]


def cable_differently(lab):
    """spark-1's port 1 to spark-2's port 0, one subnet; only one twin of each port addressed."""
    h1, h2 = lab.bed.hosts[:2]
    h1.set_ib(facts.spark_ports({1: f"{LINK}.{octet(H1)}"}))
    h2.set_ib(facts.spark_ports({0: f"{LINK}.{octet(H2)}"}))
    return h1, h2


def container_envs(lab, hosts):
    return [host.container_env(run_calls(host)[0][run_calls(host)[0].index("--name") + 1]) for host in hosts]


def ray_recipe(tmp_path):
    return write_recipe(tmp_path, "ray-recipe", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                        "defaults: {served_model_name: qwen3-1.7b, distributed_executor_backend: ray, tensor_parallel: 1}\n"
                        "command: vllm serve {model} --served-model-name {served_model_name} --host {host} "
                        "--port {port} -tp {tensor_parallel}\n")


def test_ray_nodes_advertise_one_address_and_workers_keep_their_own_interfaces(lab, tmp_path):
    h1, h2 = cable_differently(lab)
    for host in (h1, h2):
        host.fault("no_default_route")  # an offline lab
    result = run_ok(lab, ray_recipe(tmp_path), "-H", f"{H1},{H2}", "--tp", 2)
    assert f"Ready: http://{H1}:8000/v1" in result.stdout
    head, worker = container_envs(lab, (h1, h2))
    for env, host, netdev, twins in ((head, H1, "enp1s0f1np1", "roceP2p1s0f1,rocep1s0f1"),
                                     (worker, H2, "enp1s0f0np0", "roceP2p1s0f0,rocep1s0f0")):
        address = f"{LINK}.{octet(host)}"
        assert env["VLLM_HOST_IP"] == env["RAY_NODE_IP_ADDRESS"] == env["RAY_OVERRIDE_NODE_IP_ADDRESS"] == address
        assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_HCA"]) == (netdev, twins)
        assert env["UCX_NET_DEVICES"] == ",".join(f"{d}:1" for d in twins.split(","))
        assert (env["RAY_memory_monitor_refresh_ms"], env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"]) == ("0", "0")
        assert (env["NCCL_NET"], env["NCCL_IGNORE_CPU_AFFINITY"]) == ("IB", "1")
    assert f"--node-ip-address {LINK}.{octet(H2)}" in run_calls(h2)[0][-1]
    # The environment vLLM gave its worker process on spark-2 (after copying the head's NCCL_*,
    # UCX_*, VLLM_*, HF_* variables): the interface variables stayed spark-2's own.
    actor = json.loads((h2.tmp / "ray" / "actor_env.json").read_text())
    assert (actor["NCCL_SOCKET_IFNAME"], actor["NCCL_IB_HCA"]) == ("enp1s0f0np0", "roceP2p1s0f0,rocep1s0f0")
    assert actor["UCX_NET_DEVICES"] == "roceP2p1s0f0:1,rocep1s0f0:1"
    assert actor["VLLM_HOST_IP"] == f"{LINK}.{octet(H2)}"
    assert "--ulimit" in run_calls(h1)[0] and "stack=67108864" in run_calls(h1)[0]
    assert lab("stop", "--all", "-H", f"{H1},{H2}").returncode == 0


def test_native_vllm_and_sglang_in_an_offline_lab(lab):
    h1, h2 = cable_differently(lab)
    for host in (h1, h2):
        host.fault("no_default_route")
    h2.set_gpu(free_mib=90000)  # spark-2 holds more page cache: SGLang would refuse by default
    for recipe, variable in (("qwen3-1.7b-vllm", "VLLM_HOST_IP"), ("qwen3-1.7b-sglang", "SGLANG_HOST_IP")):
        lifecycle(lab, recipe, [H1, H2], "--tp", 2)
        for host, call in ((H1, run_calls(h1)[-1]), (H2, run_calls(h2)[-1])):
            env = dict(call[i + 1].split("=", 1) for i, a in enumerate(call) if a == "-e")
            assert env[variable] == f"{LINK}.{octet(host)}"
        if variable == "SGLANG_HOST_IP":
            assert env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] == "0"


def test_data_parallel_launch_on_two_hosts_reaches_ready(lab, tmp_path):
    recipe = write_recipe(tmp_path, "dp-recipe", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                          "defaults: {served_model_name: qwen3-1.7b, data_parallel: 2}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --host {host} "
                          "--port {port} --data-parallel-size {data_parallel}\n")
    result = lifecycle(lab, recipe, [H1, H2])
    assert "(vLLM data-parallel RPC)" in result.stderr  # the workers waited for DP's own rendezvous
    head, worker = (run_calls(h)[0][-1] for h in lab.bed.hosts[:2])
    rendezvous = f"--data-parallel-address {facts.default_ib(H1)[1]['ipv4']} --data-parallel-rpc-port 29501"
    assert head.endswith(f"--data-parallel-size 2 --data-parallel-size-local 1 {rendezvous}")
    assert worker.endswith(f"{rendezvous} --data-parallel-start-rank 1 --headless")
    assert run_calls(lab.bed.hosts[2]) == []


def test_solo_runs_a_two_node_recipe_on_one_host(lab, tmp_path):
    recipe = write_recipe(tmp_path, "two", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                          "min_nodes: 2\ndefaults: {served_model_name: qwen3-1.7b, tensor_parallel: 2}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --port {port} "
                          "-tp {tensor_parallel}\n")
    lifecycle(lab, recipe, [H1], "--solo")
    assert run_calls(lab.bed.hosts[0])[0][-1].endswith("-tp 1")


RING = ((1, 0, 2, 1), (2, 0, 3, 1), (3, 0, 1, 1))  # each Spark's port 0 to the next one's port 1


def netplan_addresses(host) -> dict:
    """netdev -> address in the netplan file `setup cx7` wrote on the host."""
    text = (host.root / "etc" / "netplan" / lab_setup.NETPLAN_FILE).read_text()
    return dict(re.findall(r"^    (\S+):\n(?:      .*\n)*?      addresses: \[(\S+)/24\]", text, re.M))


def test_three_sparks_in_a_ring_set_up_and_launched(lab, tmp_path):
    hosts = lab.bed.hosts
    for host in hosts:
        shutil.copy(TESTS / "setup_data" / "netplan", host.bin / "netplan")
        host.set_ib(facts.spark_ports({0: None, 1: None}))  # cabled, no addresses yet
    lab.bed.cable(*RING)
    try:
        subnets = ("--subnet1", "127.20.1.0/24", "--subnet2", "127.20.2.0/24")
        result = lab("setup", "cx7", "-H", f"{H1},{H2},{H3}", *subnets, "--yes")
        assert result.returncode == 0, result.stderr
        assert (f"Cabling: {H1} enp1s0f0np0 - {H2} enp1s0f1np1; {H1} enp1s0f1np1 - {H3} enp1s0f0np0; "
                f"{H2} enp1s0f0np0 - {H3} enp1s0f1np1") in result.stdout
        # One subnet per cable, each Spark with its own last octet on both of its links.
        expected = {H1: {"enp1s0f0np0": "127.20.1", "enp1s0f1np1": "127.20.2"},
                    H2: {"enp1s0f1np1": "127.20.1", "enp1s0f0np0": "127.20.3"},
                    H3: {"enp1s0f0np0": "127.20.2", "enp1s0f1np1": "127.20.3"}}
        for host in hosts:
            assert netplan_addresses(host) == {n: f"{net}.{octet(host.addr)}" for n, net in expected[host.addr].items()}
            # netplan applied: the links come up with these addresses.
            by_port = {port: netplan_addresses(host)[twins[0][1]] for port, twins in enumerate(facts.SPARK_PORTS)}
            host.set_ib(facts.spark_ports(by_port))
        again = lab("setup", "cx7", "-H", f"{H1},{H2},{H3}", *subnets, "--yes")
        assert "already configured (127.20.1.0/24, 127.20.2.0/24, 127.20.3.0/24, MTU 9000); kept" in again.stdout

        result = run_ok(lab, ray_recipe(tmp_path), "-H", f"{H1},{H2},{H3}", "--tp", 3)
        assert "InfiniBand/RoCE per-link subnets" in result.stderr
        assert f"Ready: http://{H1}:8000/v1" in result.stdout
        for host, env in zip((H1, H2, H3), container_envs(lab, hosts)):
            assert env["VLLM_HOST_IP"] == env["RAY_NODE_IP_ADDRESS"] == host
            assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == facts.MGMT_IF
            assert env["NCCL_IB_HCA"] == "roceP2p1s0f0,roceP2p1s0f1,rocep1s0f0,rocep1s0f1"
            assert (env["NCCL_IB_SUBNET_AWARE_ROUTING"], env["NCCL_IB_MERGE_NICS"]) == ("1", "0")
            assert "NCCL_IB_GID_INDEX" not in env
    finally:
        for host in hosts:
            (host.bin / "netplan").unlink()
            for path in [host.root / "netplan-calls", *(host.root / "etc" / "netplan").glob("*")]:
                path.unlink(missing_ok=True)


def test_three_sparks_of_a_ring_of_four_are_refused_before_any_container(lab, tmp_path):
    # spark-1 - spark-2 - spark-3 cabled in a line; the fourth Spark of the ring, which would close
    # it (spark-3 port 0 to it, it to spark-1 port 1), is not in the launch.
    for number, host in enumerate(lab.bed.hosts, start=1):
        host.set_ib(facts.spark_ports({0: f"127.20.{number}.{octet(host.addr)}",
                                       1: f"127.20.{(number + 2) % 4 + 1}.{octet(host.addr)}"}))
    result = lab("run", ray_recipe(tmp_path), "-H", f"{H1},{H2},{H3}", "--tp", "3", "--no-sync", "--no-follow")
    assert result.returncode == 2, result.stderr
    assert result.stderr == "Error: " + sparkrun.RING_ORDER_REFUSED.format(
        first=H3, second=H1, fix=sparkrun.RING_NOT_CLOSED.format(count=3)) + "\n"
    assert all(run_calls(host) == [] for host in lab.bed.hosts)


def cx7_host(name, number, cabled):
    """A Cx7Host whose ports heard `cabled[port]` (MACs of the ports on the same cable)."""
    ports = tuple(lab_setup.Cx7Port(netdev, pci, "up", 9000, port in cabled, (), f"4c:bb:47:{number:02x}:{i:02x}:01",
                                   cabled.get(port, ()))
                  for i, (port, (netdev, pci)) in enumerate(((0, ("enp1s0f0np0", "0000:01:00.0")),
                                                             (1, ("enp1s0f1np1", "0000:01:00.1"))), start=1))
    return lab_setup.Cx7Host(name, name, 22, ports)


def mac(number, port):
    return f"4c:bb:47:{number:02x}:{port + 1:02x}:01"


@pytest.mark.parametrize("cabling, expected", [
    # Two Sparks, port to same port: port 0 on the first subnet, port 1 on the second, as always.
    ({1: {0: (mac(2, 0),), 1: (mac(2, 1),)}, 2: {0: (mac(1, 0),), 1: (mac(1, 1),)}},
     {"a": ["10.0.1.1", "10.0.2.1"], "b": ["10.0.1.2", "10.0.2.2"]}),
    # A switch per port: every Spark's port 0 hears the others' port 0.
    ({n: {p: tuple(mac(o, p) for o in (1, 2, 3) if o != n) for p in (0, 1)} for n in (1, 2, 3)},
     {"a": ["10.0.1.1", "10.0.2.1"], "b": ["10.0.1.2", "10.0.2.2"], "c": ["10.0.1.3", "10.0.2.3"]}),
    # One crossed cable: spark a's port 1 to spark b's port 0, one subnet.
    ({1: {1: (mac(2, 0),)}, 2: {0: (mac(1, 1),)}}, {"a": ["10.0.1.1"], "b": ["10.0.1.2"]}),
])
def test_cx7_subnets_follow_the_cabling(cabling, expected):
    hosts = [cx7_host(name, number, cabling[number]) for number, name in zip(sorted(cabling), "abc")]
    subnets = [lab_setup.check_subnet("10.0.1.0/24", "--subnet1"), lab_setup.check_subnet("10.0.2.0/24", "--subnet2")]
    assigned = lab_setup.link_assignments(hosts, lab_setup.cx7_links(hosts), subnets, {h.host: i for i, h in
                                                                                      enumerate(hosts, start=1)})
    assert {host: [address.split("/")[0] for _, address in pairs] for host, pairs in assigned.items()} == expected
    assert lab_setup.cx7_links([cx7_host("a", 1, {})]) is None  # nothing heard: ports in order, as before


def test_cx7_mtu_mismatch_on_a_shared_subnet_warns_and_strict_refuses(lab):
    h1, h2 = lab.bed.hosts[:2]
    # A firmware update left spark-2's first port at 1500 while spark-1's stayed at 9000; the
    # probe reads each port's MTU from the host's sysfs (class/net/<netdev>/mtu).
    h2.set_ib([dict(e, mtu=1500) if e["netdev"] == "enp1s0f1np1" else e for e in facts.default_ib(H2)])
    subnet = facts.default_ib(H1)[0]["ipv4"].rpartition(".")[0] + ".0/24"
    expected = sparkrun.MTU_MISMATCH.format(
        subnet=subnet, ports=f"{H1} enp1s0f1np1 9000, {H2} enp1s0f1np1 1500", hosts=f"{H1},{H2}",
        fixes=f"on {H2}: ip link set dev enp1s0f1np1 mtu 9000")
    strict = lab("run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", 2, "--strict", "--no-sync", "--no-follow")
    assert strict.returncode == 1 and expected in strict.stderr and "because of --strict" in strict.stderr
    assert run_calls(h1) == run_calls(h2) == []
    warned = lifecycle(lab, "qwen3-1.7b-vllm", [H1, H2], "--tp", 2)
    assert f"Warning: {expected}" in warned.stderr
    h2.set_ib(None)
    assert "MTU" not in lifecycle(lab, "qwen3-1.7b-vllm", [H1, H2], "--tp", 2).stderr


def test_an_image_whose_vllm_predates_multi_node_without_ray_is_told_to_use_ray(lab, tmp_path):
    old = "example/vllm:0.10.1"  # its vLLM has no --nnodes/--node-rank/--master-addr/--master-port
    lab.bed.add_image(old, size_bytes=4096, env={"TESTBED_VLLM_VERSION": "0.10.1"})
    failed = lab("run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", 2, "--image", old, "--no-sync",
                 "--no-follow", timeout=180)
    assert failed.returncode == 1
    assert "error: unrecognized arguments: --nnodes 2 --node-rank 0 --master-addr" in failed.stderr
    (pattern, hint), = vllm_distributed.FAILURE_HINTS
    assert failed.stderr.rstrip().endswith(f"hint: {hint}")
    everything_stopped(lab)
    # The hint's way out: the same image runs the Ray flow.
    ray = write_recipe(tmp_path, "ray-old", ray_recipe(tmp_path).read_text().replace(IMAGES["vllm"], old))
    assert f"Ready: http://{H1}:8000/v1" in run_ok(lab, ray, "-H", f"{H1},{H2}", "--tp", 2).stdout
    assert lab("stop", "--all", "-H", f"{H1},{H2}").returncode == 0
