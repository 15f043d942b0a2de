"""The launch plan as pure data: runtimes, rendezvous, NCCL env, secrets, host strings."""


import json
import re

import pytest

import sparkrun as sr
from conftest import REPO

RUNTIME_MODULES = ["vllm-distributed", "vllm-ray", "sglang", "llama-cpp", "eugr-vllm"]
HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def recipe_for(tmp_path, runtime, command):
    version = "recipe_version: '1'\n" if runtime == "eugr-vllm" else f"runtime: {runtime}\n"
    return sr.load_recipe(write(tmp_path, f"model: org/m\ncontainer: img:1\n{version}command: {command}\n"))


@pytest.mark.parametrize("runtime", RUNTIME_MODULES)
def test_runtime_examples(tmp_path, runtime):
    module = sr.load_runtime(runtime)
    assert module.NAME == runtime
    for nodes, command, expected in module.EXAMPLES:
        recipe = recipe_for(tmp_path, runtime, command)
        selection = sr.HostSelection(HOSTS[:nodes], None, "test")
        plan = sr.plan_launch(recipe, selection, sr.LaunchOptions(overrides={"tensor_parallel": nodes}))
        fill = {"{rendezvous}": plan.rendezvous, **{f"{{worker{i}}}": h for i, h in enumerate(HOSTS[:nodes]) if i}}
        for key, value in fill.items():
            expected = [e.replace(key, value) for e in expected]
        assert [c.command for c in plan.containers] == expected
        assert plan.containers[-1 if runtime == "llama-cpp" and nodes > 1 else 0].role == "head"


def test_labels_names_and_stable_cluster_id(tmp_path):
    recipe = sr.find_recipe("qwen3-1.7b-vllm")
    selection = sr.HostSelection(HOSTS[:2], None, "test")
    plan = sr.plan_launch(recipe, selection, sr.LaunchOptions(overrides={"tensor_parallel": 2, "port": 9000}))
    again = sr.plan_launch(recipe, sr.HostSelection(HOSTS[1::-1][::-1], None, "x"),
                           sr.LaunchOptions(overrides={"tensor_parallel": 2, "port": 9000}))
    assert plan.cluster_id == again.cluster_id
    head, worker = plan.containers
    assert head.name == f"{plan.cluster_id}_head" and worker.name == f"{plan.cluster_id}_worker1"
    labels = dict(head.labels)
    assert labels["sparkrun.recipe"] == "qwen3-1.7b-vllm" and labels["sparkrun.port"] == "9000"
    assert labels["sparkrun.role"] == "head" and dict(worker.labels)["sparkrun.role"] == "worker1"
    other_port = sr.plan_launch(recipe, selection, sr.LaunchOptions(overrides={"tensor_parallel": 2}))
    assert other_port.cluster_id != plan.cluster_id


def ib_facts(host, devices, mgmt):
    addresses = [("lo", "127.0.0.1/8"), ("enP7s7", f"{mgmt}/24")] + [(d[1], d[2]) for d in devices]
    ib = tuple(sr.IbDevice(hca, "4: ACTIVE", netdev, cidr, gid) for hca, netdev, cidr, gid in devices)
    return sr.HostFacts(host, addresses=tuple(addresses), ib=ib)


def test_nccl_env_is_per_host_and_rendezvous_uses_shared_ib_subnet(tmp_path):
    facts = {
        "h1": ib_facts("h1", [("rocep1s0f1", "enp1s0f1np1", "10.10.10.1/24", 3)], "192.0.2.1"),
        "h2": ib_facts("h2", [("roceP2p1s0f1", "enP2p1s0f1np1", "10.10.10.2/24", 1)], "192.0.2.2"),
    }
    recipe = sr.find_recipe("qwen3-1.7b-sglang")
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1", "h2"), None, "t"),
                          sr.LaunchOptions(overrides={"tensor_parallel": 2}), facts)
    env = {c.host: dict(c.env) for c in plan.containers}
    assert env["h1"]["NCCL_IB_HCA"] == "rocep1s0f1" and env["h1"]["NCCL_SOCKET_IFNAME"] == "enp1s0f1np1"
    assert env["h2"]["NCCL_IB_HCA"] == "roceP2p1s0f1" and env["h2"]["NCCL_SOCKET_IFNAME"] == "enP2p1s0f1np1"
    assert env["h1"]["NCCL_IB_GID_INDEX"] == "3" and env["h2"]["NCCL_IB_GID_INDEX"] == "1"
    assert plan.rendezvous == "10.10.10.1" and "all nodes on 10.10.10.0/24" in plan.rendezvous_reason
    assert all(c.privileged for c in plan.containers)


def test_rendezvous_falls_back_to_management_and_socket_env_without_ib():
    facts = {
        "h1": ib_facts("h1", [("rocep1s0f1", "enp1s0f1np1", "10.10.10.1/24", 3)], "192.0.2.1"),
        "h2": ib_facts("h2", [], "192.0.2.2"),
    }
    recipe = sr.find_recipe("qwen3-1.7b-vllm")
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1", "h2"), None, "t"),
                          sr.LaunchOptions(overrides={"tensor_parallel": 2}), facts)
    assert plan.rendezvous == "192.0.2.1" and plan.rendezvous_reason.startswith("management network")
    env2 = dict(plan.containers[1].env)
    assert env2["NCCL_IB_DISABLE"] == "1" and env2["NCCL_SOCKET_IFNAME"] == "enP7s7"
    assert any("no active InfiniBand" in n for n in plan.notes)


def test_rendezvous_never_loopback_for_real_multi_host():
    facts = {"h2": sr.HostFacts("h2", addresses=(("lo", "127.0.0.1/8"), ("eth0", "192.0.2.2/24")))}
    with pytest.raises(sr.UsageError, match="localhost: only a loopback address"):
        sr.choose_rendezvous(("localhost", "h2"), facts)
    facts["127.0.0.1"] = sr.HostFacts("127.0.0.1", addresses=(("lo", "127.0.0.1/8"), ("eth0", "192.0.2.1/24")))
    assert sr.choose_rendezvous(("127.0.0.1", "h2"), facts)[0] == "192.0.2.1"


def test_secrets_masked_and_sent_in_env_file(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: vllm\n"
                                            "env: {API: '${MY_SECRET}', PLAIN: x}\ncommand: vllm serve {model}\n"))
    environ = {"MY_SECRET": "s3cr3t-value", "HF_TOKEN": "hf_abcdef"}
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1",), None, "t"), sr.LaunchOptions(overrides={}),
                          environ=environ)
    spec = plan.containers[0]
    assert dict(spec.secret_env) == {"API": "s3cr3t-value", "HF_TOKEN": "hf_abcdef"}
    assert dict(spec.env)["PLAIN"] == "x"
    shown = plan.describe()
    assert "s3cr3t" not in shown and "hf_abc" not in shown and "secret API=***" in shown
    script, data = sr.start_container_script(spec)
    run_line = next(l for l in script.splitlines() if l.startswith("docker run"))
    assert "s3cr3t" not in script and "hf_abc" not in script
    assert f"--env-file <(head -c {len(data)})" in run_line and script.endswith("start; exit\n")
    assert data == b"API=s3cr3t-value\nHF_TOKEN=hf_abcdef\n"


def test_unset_env_reference_is_named():
    recipe = sr.Recipe("r", REPO / "x.yaml", "Local", model="m", command="x", env={"A": "${NOPE_NOT_SET}"})
    with pytest.raises(sr.UsageError, match=r"env A uses \$\{NOPE_NOT_SET\}, which is not set here"):
        sr.expand_env(recipe, {})


@pytest.mark.parametrize("host", ["spark1", "spark-2.lab", "10.0.0.5", "fe80::1", "[::1]", "user@spark1",
                                  "my_alias"])
def test_valid_hosts(host):
    assert sr.validate_host(host) == host


@pytest.mark.parametrize("host", ["-oProxyCommand=x", "a b", "a;b", "$(id)", "a|b", "", "host`", "a&&b"])
def test_invalid_hosts(host):
    with pytest.raises(sr.UsageError):
        sr.validate_host(host)


def test_hosts_file_and_duplicates(tmp_path):
    path = write(tmp_path, "# lab\nspark1\n\nspark2  # second\n", "hosts")
    assert sr.read_hosts_file(str(path)) == ["spark1", "spark2"]
    with pytest.raises(sr.UsageError, match="host listed twice: a"):
        sr.parse_host_list("a,b,a")


def test_node_limits(tmp_path):
    recipe = sr.find_recipe("qwen3-1.7b-llama-cpp")
    with pytest.raises(sr.UsageError, match="at most 1 host"):
        sr.plan_launch(recipe, sr.HostSelection(HOSTS, None, "t"), sr.LaunchOptions(overrides={"tensor_parallel": 2}))
    eugr = sr.load_recipe(REPO.parent / "shared/corpus/eugr-spark-vllm-docker/recipes/4x-spark-cluster/minimax-m2.5.yaml")
    with pytest.raises(sr.UsageError, match="needs 4 hosts"):
        sr.plan_launch(eugr, sr.HostSelection(HOSTS, None, "--hosts"), sr.LaunchOptions(overrides={}))


def test_remote_join_expands_home_and_quotes_the_rest():
    assert sr.remote_join(["-v", "~/.cache/huggingface:/root/.cache/huggingface", "a b"]) == \
        "-v \"$HOME\"/.cache/huggingface:/root/.cache/huggingface 'a b'"


def test_listening_addresses_from_ss():
    assert sr.listen_address("127.0.0.11:8000") == ("127.0.0.11", 8000)
    assert sr.listen_address("[::]:22") == ("::", 22)
    assert sr.listen_address("*:80") == ("0.0.0.0", 80)
    assert sr.listen_address("[::ffff:127.0.0.11]:8001") == ("127.0.0.11", 8001)
    assert sr.listen_address("127.0.0.53%lo:53") == ("127.0.0.53", 53)
    assert sr.listen_address("[fe80::1%eth0]:9000") == ("fe80::1", 9000)


def test_probe_output_parses_raw_tool_output():
    output = "\n".join([
        "Welcome to the lab (a login banner before the script's output)",
        "@@hostname", "spark1", "@@ib", "rocep1s0f1|4: ACTIVE|enp1s0f1np1|3",
        "@@addrs",
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever",
        "2: enP7s7    inet 10.0.0.5/24 brd 10.0.0.255 scope global enP7s7\\       valid_lft forever",
        "4: enp1s0f1np1    inet 192.168.200.1/24 brd 192.168.200.255 scope global enp1s0f1np1",
        "@@listen",
        "State  Recv-Q Send-Q Local Address:Port Peer Address:Port",  # an old ss without -H
        "LISTEN 0      4096   127.0.0.11:8000    0.0.0.0:*",
        "LISTEN 0      128    [::]:22            [::]:*",
        "@@gpu", "NVIDIA GB10, 122572 MiB",
        "@@docker", '{"Names":"sparkrun_abc_head","Labels":"sparkrun.cluster=abc"}',
        "@@images", "img:1\tsha256:1234", "img:2\t", "@@end"])
    facts = sr.parse_probe("h1", output)
    assert (facts.hostname, facts.gpu, facts.management_ip) == ("spark1", "NVIDIA GB10, 122572 MiB", "10.0.0.5")
    assert facts.addresses[1:] == (("enP7s7", "10.0.0.5/24"), ("enp1s0f1np1", "192.168.200.1/24"))
    assert [(d.hca, d.ipv4, d.gid_index) for d in facts.active_ib] == [("rocep1s0f1", "192.168.200.1/24", 3)]
    assert facts.listening == (("127.0.0.11", 8000), ("::", 22))
    assert facts.port_busy(22) and not facts.port_busy(8000)  # 127.0.0.11 is not one of this host's addresses
    assert [c["Names"] for c in facts.containers] == ["sparkrun_abc_head"] and not facts.docker_error
    assert (facts.image_id("img:1"), facts.image_id("img:2")) == ("sha256:1234", "")
    failed = sr.parse_probe("h1", "@@docker\npermission denied while trying to connect\n@@docker_failed\n@@end")
    assert failed.docker_error == "permission denied while trying to connect" and not failed.containers


def test_embedding_recipes_stop_at_models(tmp_path):
    path = REPO.parent / "shared/corpus/spark-arena-recipe-registry/official-recipes/qwen3-vl/vllm/qwen3-vl-embedding-8b-vllm.yaml"
    plan = sr.plan_launch(sr.load_recipe(path), sr.HostSelection(("h1",), None, "t"), sr.LaunchOptions(overrides={}))
    assert plan.readiness == "models"
    assert sr.plan_launch(sr.find_recipe("qwen3-1.7b-vllm"), sr.HostSelection(("h1",), None, "t"),
                          sr.LaunchOptions(overrides={})).readiness == "generate"


def test_dry_run_contacts_nothing_and_prints_the_plan(cli):
    result = cli("run", "qwen3-1.7b-vllm", "-H", "192.0.2.7,192.0.2.8", "--tp", "2", "--dry-run",
                 env={"SPARKRUN_SSH_OPTS": "-o ProxyCommand=false"}, check=0)
    assert "Rendezvous:" in result.stdout and result.stdout.count("docker run -d") == 2
    assert "--node-rank 1" in result.stdout and "--headless" in result.stdout


def test_third_party_runtime_from_an_entry_point(cli, tmp_path):
    plugins = tmp_path / "plugins"
    (plugins / "myrt-1.0.dist-info").mkdir(parents=True)
    (plugins / "myrt-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myrt\nVersion: 1.0\n")
    (plugins / "myrt-1.0.dist-info" / "entry_points.txt").write_text("[sparkrun.runtimes]\nmy-engine = myrt\n")
    (plugins / "myrt.py").write_text('NAME = "my-engine"\n\n\ndef plan(ctx):\n'
                                     '    return [ctx.start(0, "my-engine-serve " + ctx.serve_command)]\n')
    recipe = write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: my-engine\ncommand: serve {model} --port {port}\n")
    result = cli("run", recipe, "-H", "h1", "--dry-run", env={"PYTHONPATH": str(plugins)}, check=0)
    assert "(my-engine)" in result.stdout and "bash -c 'my-engine-serve serve org/m --port 8000'" in result.stdout
    assert cli("run", recipe, "-H", "h1", "--dry-run").returncode == 2  # without the plugin: unknown runtime
    bare = write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: my-engine\n", "bare.yaml")
    result = cli("run", bare, "-H", "h1", "--dry-run", env={"PYTHONPATH": str(plugins)})
    assert result.returncode == 2 and result.stderr.strip() == (
        f"Error: {bare}: field 'command' is required: runtime my-engine has no default serve command")


def test_vram_warning_and_strict(cli, tmp_path):
    recipe = write(tmp_path, "model: org/huge\ncontainer: img:1\nruntime: vllm\n"
                             "metadata: {model_params: 400B, model_dtype: bf16, num_layers: 80, num_kv_heads: 8, head_dim: 128}\n"
                             "defaults: {max_model_len: 32768}\ncommand: vllm serve {model}\n")
    result = cli("run", recipe, "-H", "h1", "--dry-run", check=0)
    assert "Warning: recipe r may not fit:" in result.stderr and "per GPU" in result.stderr
    strict = cli("run", recipe, "-H", "h1", "--dry-run", "--strict")
    assert strict.returncode == 2 and "refusing because of --strict" in strict.stderr and strict.stdout == ""


def test_records_are_immutable_values_with_copied_defaults(tmp_path):
    first = sr.load_recipe(write(tmp_path, "model: org/m\ncontainer: img:1\ncommand: vllm serve {model}\n"))
    second = sr.load_recipe(write(tmp_path, "model: org/n\ncontainer: img:1\ncommand: vllm serve {model}\n", "s.yaml"))
    first.env["A"] = "1"
    assert second.env == {} and sr.Recipe.env == {}  # a list or dict default is per instance
    selection = sr.HostSelection(HOSTS[:1], None, "test")
    with pytest.raises(AttributeError, match="immutable"):
        selection.user = "root"
    changed = selection.replace(user="root")
    assert (changed.user, changed.hosts, selection.user) == ("root", HOSTS[:1], None)
    assert changed.as_dict() == {"hosts": HOSTS[:1], "user": "root", "source": "test"}
    with pytest.raises(TypeError, match="missing field 'source'"):
        sr.HostSelection(HOSTS[:1], None)
    with pytest.raises(TypeError, match="unexpected or repeated field 'hosts'"):
        sr.HostSelection(HOSTS[:1], hosts=HOSTS, user=None, source="test")


def spark_facts(host, octet, mgmt, ports):
    """A Spark's facts: `ports` maps a CX7 port (0, 1) to its address; each port shows as twin
    RDMA devices, the address on the first twin only. Ports not listed have no link."""
    names = {0: ("rocep1s0f0", "enp1s0f0np0", "roceP2p1s0f0", "enP2p1s0f0np0"),
             1: ("rocep1s0f1", "enp1s0f1np1", "roceP2p1s0f1", "enP2p1s0f1np1")}
    ib, addresses = [], [("lo", "127.0.0.1/8"), ("enP7s7", f"{mgmt}/24")]
    for port, (hca, netdev, twin, twin_netdev) in names.items():
        state = "4: ACTIVE" if port in ports else "1: DOWN"
        cidr = f"{ports[port]}.{octet}/24" if port in ports else None
        ib += [sr.IbDevice(hca, state, netdev, cidr, 3 if cidr else None), sr.IbDevice(twin, state, twin_netdev, None, None)]
        if cidr:
            addresses.append((netdev, cidr))
    return sr.HostFacts(host, addresses=tuple(addresses), ib=tuple(ib))


TWO_SPARKS = {"h1": spark_facts("h1", 1, "192.0.2.1", {1: "10.0.1"}),
              "h2": spark_facts("h2", 2, "192.0.2.2", {1: "10.0.1"})}


def two_node_plan(tmp_path, runtime, command, facts=TWO_SPARKS, hosts=("h1", "h2"), **defaults):
    recipe = recipe_for(tmp_path, runtime, command)
    return sr.plan_launch(recipe, sr.HostSelection(hosts, None, "t"),
                          sr.LaunchOptions(overrides={"tensor_parallel": len(hosts), **defaults}), facts)


def test_both_roce_twins_of_the_port_in_use_and_ucx_device_ports(tmp_path):
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m")
    env = dict(plan.containers[1].env)
    assert env["NCCL_IB_HCA"] == "roceP2p1s0f1,rocep1s0f1"  # the unaddressed twin too; port 0 has no link
    assert env["UCX_NET_DEVICES"] == "roceP2p1s0f1:1,rocep1s0f1:1"
    assert (env["NCCL_SOCKET_IFNAME"], env["GLOO_SOCKET_IFNAME"]) == ("enp1s0f1np1", "enp1s0f1np1")
    assert (env["NCCL_NET"], env["NCCL_IGNORE_CPU_AFFINITY"]) == ("IB", "1")
    argv = plan.containers[0].docker_run_argv()
    assert argv[argv.index("stack=67108864") - 1] == "--ulimit"


def both_twins_addressed(n, twin_gid=3):
    """Spark n with both twins of port 1 addressed, the second twin's IPv4 GID at twin_gid."""
    return ib_facts(f"h{n}", [("rocep1s0f1", "enp1s0f1np1", f"10.0.1.{n}/24", 3),
                              ("roceP2p1s0f1", "enP2p1s0f1np1", f"10.0.9.{n}/24", twin_gid)], f"192.0.2.{n}")


def test_gid_index_pinned_only_when_every_listed_device_shares_it(tmp_path):
    # `setup cx7` addresses one twin per port: the other has no IPv4 RoCE v2 GID at index 3, so
    # NCCL chooses each device's GID itself.
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m")
    assert all("NCCL_IB_GID_INDEX" not in dict(c.env) for c in plan.containers)
    both = {"h1": both_twins_addressed(1), "h2": both_twins_addressed(2)}
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", both)
    assert [dict(c.env)["NCCL_IB_GID_INDEX"] for c in plan.containers] == ["3", "3"]
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", dict(both, h2=both_twins_addressed(2, 4)))
    assert "NCCL_IB_GID_INDEX" in dict(plan.containers[0].env)
    assert "NCCL_IB_GID_INDEX" not in dict(plan.containers[1].env)


@pytest.mark.parametrize("runtime", ["vllm-distributed", "vllm-ray", "eugr-vllm"])
def test_every_vllm_node_advertises_its_rendezvous_address(tmp_path, runtime):
    plan = two_node_plan(tmp_path, runtime, "vllm serve m")
    assert plan.rendezvous == "10.0.1.1"
    for container, address in zip(plan.containers, ("10.0.1.1", "10.0.1.2")):
        env = dict(container.env)
        assert env["VLLM_HOST_IP"] == address
        if runtime != "vllm-distributed":
            assert f"--node-ip-address {address}" in container.command
            assert env["RAY_NODE_IP_ADDRESS"] == env["RAY_OVERRIDE_NODE_IP_ADDRESS"] == address
            assert (env["RAY_memory_monitor_refresh_ms"], env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"]) == ("0", "0")
    if runtime != "vllm-distributed":
        head = plan.containers[0].command
        assert "ray_non_carry_over_env_vars.json" in head and '"NCCL_IB_HCA"' in head and '"UCX_NET_DEVICES"' in head
    solo = sr.plan_launch(recipe_for(tmp_path, runtime, "vllm serve m"), sr.HostSelection(("h1",), None, "t"),
                          sr.LaunchOptions(overrides={}), TWO_SPARKS)
    assert "VLLM_HOST_IP" not in dict(solo.containers[0].env)


def test_multi_node_sglang_host_address_and_no_memory_balance_check(tmp_path):
    plan = two_node_plan(tmp_path, "sglang", "sglang serve --model-path m")
    for container, address in zip(plan.containers, ("10.0.1.1", "10.0.1.2")):
        env = dict(container.env)
        assert env["SGLANG_HOST_IP"] == address and env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] == "0"


def test_data_parallel_one_replica_per_node(tmp_path):
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", tensor_parallel=1, data_parallel=2)
    head, worker = (c.command for c in plan.containers)
    dp = "--data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-address 10.0.1.1 --data-parallel-rpc-port 29501"
    assert head == f"vllm serve m {dp}"
    assert worker == f"vllm serve m {dp} --data-parallel-start-rank 1 --headless"
    assert [s.action for s in plan.steps] == ["start", "wait_port", "start"] and plan.steps[1].reason == "vLLM data-parallel RPC"
    with pytest.raises(sr.UsageError, match="one replica per node"):
        two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", {}, hosts=("h1", "h2", "h3", "h4"),
                      tensor_parallel=2, data_parallel=2)
    ray = two_node_plan(tmp_path, "vllm-ray", "vllm serve m -dp 2", tensor_parallel=1)
    assert len(ray.hosts) == 2 and ray.containers[0].command.endswith("-dp 2 --distributed-executor-backend ray "
                                                                       "--data-parallel-backend ray")


def test_solo_means_one_node_and_a_cluster_only_recipe_refuses_it(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: vllm\nmin_nodes: 2\n"
                                            "defaults: {tensor_parallel: 2}\ncommand: vllm serve {model} -tp {tensor_parallel}\n"))
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1",), None, "--solo"), sr.LaunchOptions(overrides={}, solo=True))
    assert plan.hosts == ("h1",) and plan.containers[0].command == "vllm serve org/m -tp 1"
    cluster = sr.load_recipe(write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: vllm\ncluster_only: true\n"
                                             "command: vllm serve {model}\n", "c.yaml"))
    with pytest.raises(sr.UsageError, match=re.escape(sr.solo_refused("c"))):
        sr.plan_launch(cluster, sr.HostSelection(("h1",), None, "--solo"), sr.LaunchOptions(overrides={}, solo=True))


def test_ring_of_three_uses_per_link_subnets_and_the_management_rendezvous(tmp_path):
    # spark1 port 0 - spark2 port 1 (10.0.1.0/24), spark2 port 0 - spark3 port 1 (10.0.2.0/24),
    # spark3 port 0 - spark1 port 1 (10.0.3.0/24).
    facts = {"h1": spark_facts("h1", 1, "192.0.2.1", {0: "10.0.1", 1: "10.0.3"}),
             "h2": spark_facts("h2", 2, "192.0.2.2", {0: "10.0.2", 1: "10.0.1"}),
             "h3": spark_facts("h3", 3, "192.0.2.3", {0: "10.0.3", 1: "10.0.2"})}
    plan = two_node_plan(tmp_path, "vllm-ray", "vllm serve m", facts, hosts=("h1", "h2", "h3"))
    assert plan.rendezvous == "192.0.2.1" and plan.rendezvous_reason.startswith("management network")
    for container, number in zip(plan.containers, (1, 2, 3)):
        env = dict(container.env)
        assert env["VLLM_HOST_IP"] == f"192.0.2.{number}" and env["NCCL_SOCKET_IFNAME"] == "enP7s7"
        assert env["NCCL_IB_HCA"] == "roceP2p1s0f0,roceP2p1s0f1,rocep1s0f0,rocep1s0f1"
        assert (env["NCCL_IB_SUBNET_AWARE_ROUTING"], env["NCCL_IB_MERGE_NICS"]) == ("1", "0")
        assert "NCCL_IB_GID_INDEX" not in env and "NCCL_ALGO" not in env
    assert any("per-link subnets" in note for note in plan.notes)
    # A full mesh: every order is a cable order.
    assert two_node_plan(tmp_path, "vllm-ray", "vllm serve m", facts, hosts=("h1", "h3", "h2")).hosts == ("h1", "h3", "h2")


# Four Sparks in a closed ring: port 0 of each to port 1 of the next, spark4 back to spark1, one
# /24 per cable (eugr/spark-vllm-docker docs/NETWORKING.md, "Example: four-node ring").
RING_OF_FOUR = {f"h{n}": spark_facts(f"h{n}", n, f"192.0.2.{n}", {0: f"10.0.{n}", 1: f"10.0.{(n + 2) % 4 + 1}"})
                for n in (1, 2, 3, 4)}


def test_ring_of_four_in_cable_order_pins_the_ring_algorithm(tmp_path):
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", RING_OF_FOUR, hosts=("h1", "h2", "h3", "h4"))
    assert plan.rendezvous_reason.startswith("management network")
    for container in plan.containers:
        env = dict(container.env)
        assert env["NCCL_ALGO"] == "Ring" and env["NCCL_IB_SUBNET_AWARE_ROUTING"] == "1"
    reversed_ring = two_node_plan(tmp_path, "vllm-ray", "vllm serve m", RING_OF_FOUR, hosts=("h1", "h4", "h3", "h2"))
    assert [dict(c.env)["NCCL_ALGO"] for c in reversed_ring.containers] == ["Ring"] * 4


def test_ring_of_four_out_of_cable_order_is_refused_with_the_order_that_works(tmp_path):
    with pytest.raises(sr.UsageError) as refused:
        two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", RING_OF_FOUR, hosts=("h1", "h3", "h2", "h4"))
    assert str(refused.value) == sr.RING_ORDER_REFUSED.format(
        first="h1", second="h3", fix=sr.RING_ORDER_FIX.format(order="h1,h2,h3,h4"))


def test_three_hosts_of_a_ring_of_four_lack_the_closing_link(tmp_path):
    with pytest.raises(sr.UsageError) as refused:
        two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", RING_OF_FOUR, hosts=("h1", "h2", "h3"))
    assert str(refused.value) == sr.RING_ORDER_REFUSED.format(
        first="h3", second="h1", fix=sr.RING_NOT_CLOSED.format(count=3))


def test_a_recipes_own_nccl_algo_wins_on_a_ring(tmp_path):
    recipe = sr.load_recipe(write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: vllm\n"
                                            "env: {NCCL_ALGO: Tree}\ncommand: vllm serve {model}\n"))
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1", "h2", "h3", "h4"), None, "t"),
                          sr.LaunchOptions(overrides={"tensor_parallel": 4}), RING_OF_FOUR)
    assert [[v for k, v in c.env if k == "NCCL_ALGO"] for c in plan.containers] == [["Tree"]] * 4


def test_a_recipes_own_network_and_address_variables_win_over_each_hosts(tmp_path):
    """A recipe's env wins over what sparkrun works out per host; the plan names what it replaced."""
    recipe = sr.load_recipe(write(tmp_path, "model: org/m\ncontainer: img:1\nruntime: vllm\n"
                                            "env: {NCCL_IB_HCA: mlx5_0, VLLM_HOST_IP: 10.9.9.9, NCCL_DEBUG: INFO}\n"
                                            "command: vllm serve {model}\n"))
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1", "h2", "h3", "h4"), None, "t"),
                          sr.LaunchOptions(overrides={"tensor_parallel": 4}), RING_OF_FOUR)
    for container in plan.containers:
        keys = [k for k, _ in container.env]
        assert keys.count("NCCL_IB_HCA") == keys.count("VLLM_HOST_IP") == 1
        assert dict(container.env)["NCCL_IB_HCA"] == "mlx5_0" and dict(container.env)["VLLM_HOST_IP"] == "10.9.9.9"
        assert dict(container.env)["NCCL_ALGO"] == "Ring"  # what the recipe does not set stays
        assert sr.RECIPE_ENV_WINS.format(host=container.host, keys="NCCL_IB_HCA, VLLM_HOST_IP") in plan.notes
    plain = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", RING_OF_FOUR, hosts=("h1", "h2", "h3", "h4"))
    assert not any("the recipe's own" in note for note in plain.notes)


def test_one_shared_subnet_sets_no_algorithm_and_checks_no_order(tmp_path):
    switch = {f"h{n}": spark_facts(f"h{n}", n, f"192.0.2.{n}", {1: "10.0.9"}) for n in (1, 2, 3, 4)}
    plan = two_node_plan(tmp_path, "vllm-distributed", "vllm serve m", switch, hosts=("h1", "h3", "h2", "h4"))
    assert all("NCCL_ALGO" not in dict(c.env) for c in plan.containers)


# Qwen/Qwen3-1.7B's config.json, as far as the head counts go.
QWEN3_1_7B_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "num_attention_heads": 16, "num_key_value_heads": 8,
                     "num_hidden_layers": 28, "hidden_size": 2048, "head_dim": 128, "torch_dtype": "bfloat16",
                     "max_position_embeddings": 40960}


@pytest.mark.parametrize("runtime", ["vllm-distributed", "vllm-ray", "sglang"])
def test_tensor_parallel_must_split_the_attention_heads(tmp_path, runtime):
    arch = sr.arch_from_config(QWEN3_1_7B_CONFIG)
    assert (arch.num_attention_heads, arch.num_kv_heads) == (16, 8)
    recipe = recipe_for(tmp_path, runtime, "serve m")
    selection = sr.HostSelection(HOSTS, None, "test")
    with pytest.raises(sr.UsageError) as refused:
        sr.plan_launch(recipe, selection, sr.LaunchOptions(overrides={"tensor_parallel": 3}), arch=arch)
    assert str(refused.value) == sr.TP_HEADS_REFUSED.format(model="org/m", heads=16, kv_heads=8, runtime=runtime,
                                                             tp=3, sizes="1, 2, 4, 8 or 16")
    assert len(sr.plan_launch(recipe, selection, sr.LaunchOptions(overrides={"tensor_parallel": 2}),
                              arch=arch).hosts) == 2
    assert len(sr.plan_launch(recipe, selection, sr.LaunchOptions(overrides={"tensor_parallel": 3})).hosts) == 3


def test_key_value_heads_are_split_or_replicated_evenly(tmp_path):
    # 24 query heads split over 3 ranks, but 8 key/value heads do not (vLLM's and SGLang's
    # QKVParallelLinear); 16 ranks over 8 key/value heads replicate each twice.
    arch = sr.arch_from_config(dict(QWEN3_1_7B_CONFIG, num_attention_heads=24))
    recipe = recipe_for(tmp_path, "vllm-distributed", "vllm serve m")
    with pytest.raises(sr.UsageError, match=re.escape("use --tp 1, 2, 4, 8 or 24")):
        sr.plan_launch(recipe, sr.HostSelection(HOSTS, None, "t"),
                       sr.LaunchOptions(overrides={"tensor_parallel": 3}), arch=arch)
    llama = recipe_for(tmp_path, "llama-cpp", "llama-server -m /m.gguf")  # no head rule of its own
    assert len(sr.plan_launch(llama, sr.HostSelection(HOSTS, None, "t"),
                              sr.LaunchOptions(overrides={"tensor_parallel": 3}), arch=arch).hosts) == 3


def cache_config(hf_home, repo, config):
    """A local Hugging Face cache holding only the repo's config.json (what `show` fetches)."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    (repo_dir / "snapshots" / "abc123").mkdir(parents=True)
    (repo_dir / "snapshots" / "abc123" / "config.json").write_text(json.dumps(config))


def test_dry_run_refuses_a_tensor_parallel_size_the_heads_do_not_divide(cli):
    three = ["run", "qwen3-1.7b-vllm", "-H", "10.0.0.1,10.0.0.2,10.0.0.3", "--dry-run"]
    unknown = cli(*three, "--tp", 3)  # no config.json anywhere (offline, nothing cached): no check
    assert unknown.returncode == 0 and "10.0.0.3" in unknown.stdout
    cache_config(cli.home / "hf", "Qwen/Qwen3-1.7B", QWEN3_1_7B_CONFIG)
    refused = cli(*three, "--tp", 3)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == ("Error: " + sr.TP_HEADS_REFUSED.format(
        model="Qwen/Qwen3-1.7B", heads=16, kv_heads=8, runtime="vllm-distributed", tp=3, sizes="1, 2, 4, 8 or 16"))
    assert cli(*three, "--tp", 2, check=0).stdout.count("docker run") == 2


def test_the_head_counts_come_from_the_hub_when_online(cli):
    """A bundled recipe's metadata sizes its KV cache, but only config.json has the attention heads:
    with tensor parallel, run asks the Hub for it when it is reachable."""
    from hubserver import FakeHub, make_safetensors_repo
    from test_distribution import online

    with FakeHub({"Qwen/Qwen3-1.7B": make_safetensors_repo(size=1 << 10)}) as hub:
        refused = cli("run", "qwen3-1.7b-vllm", "-H", "10.0.0.1,10.0.0.2,10.0.0.3", "--tp", 3, "--dry-run",
                      env=online(hub))
    assert refused.returncode == 2 and "has 16 attention heads (8 key/value heads)" in refused.stderr
