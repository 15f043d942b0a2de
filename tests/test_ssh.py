"""The SSH layer, saved clusters and `status`, end to end through real sshd hosts."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import H1, H2, H3, ib_address, REPO

ALL = f"{H1},{H2},{H3}"


def test_cluster_crud(cli):
    cli("cluster", "create", "lab", "-H", f"{H1},{H2}", "-d", "two sparks", "--user", "root", check=0)
    shown = json.loads(cli("cluster", "show", "lab", "--json", check=0).stdout)
    assert shown == {"name": "lab", "hosts": [H1, H2], "description": "two sparks", "user": "root"}
    cli("cluster", "update", "lab", "-H", ALL, "-d", "three", check=0)
    cli("cluster", "set-default", "lab", check=0)
    assert cli("cluster", "default", check=0).stdout.strip() == "lab"
    listing = cli("cluster", "list", check=0).stdout
    assert "* lab" in listing and "three" in listing
    data = yaml.safe_load((cli.home / "config" / "clusters.yaml").read_text())
    assert data["default"] == "lab" and data["clusters"]["lab"]["hosts"] == [H1, H2, H3]
    cli("cluster", "unset-default", check=0)
    assert cli("cluster", "default", check=0).stdout.strip() == "No default cluster."
    cli("cluster", "delete", "lab", check=0)
    assert json.loads(cli("cluster", "list", "--json", check=0).stdout)["clusters"] == {}


@pytest.mark.parametrize("args, message", [
    (["create", "bad name", "-H", H1], "invalid cluster name 'bad name'"),
    (["create", "lab", "-H", f"{H1},{H1}"], f"host listed twice: {H1}"),
    (["create", "lab", "-H", "-oProxyCommand=touch /tmp/x"], "invalid host '-oProxyCommand=touch /tmp/x'"),
    (["create", "lab"], "a cluster needs hosts"),
    (["show", "nope"], "no cluster named 'nope'"),
    (["set-default", "nope"], "no cluster named 'nope'"),
])
def test_cluster_errors_are_one_line_and_change_nothing(cli, args, message):
    result = cli("cluster", *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (cli.home / "config" / "clusters.yaml").exists()


def test_cluster_create_twice_is_an_error(cli):
    cli("cluster", "create", "lab", "-H", H1, check=0)
    before = (cli.home / "config" / "clusters.yaml").read_bytes()
    result = cli("cluster", "create", "lab", "-H", H2)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (cli.home / "config" / "clusters.yaml").read_bytes() == before


def test_concurrent_cluster_writes_do_not_corrupt(cli):
    procs = [subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), "cluster", "create", f"c{i}",
                               "-H", f"h{i}"], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(8)]
    assert [p.wait(60) for p in procs] == [0] * 8
    data = yaml.safe_load((cli.home / "config" / "clusters.yaml").read_text())
    assert sorted(data["clusters"]) == [f"c{i}" for i in range(8)]


def status(bed, *args):
    result = bed("status", "--json", *args)
    return result, json.loads(result.stdout) if result.stdout.startswith("{") else None


def test_status_three_hosts_one_connection_each(bed):
    bed.bed.close_client_masters()
    for host in bed.bed.hosts:
        host.reset_connections()
    result, data = status(bed, "-H", ALL)
    assert result.returncode == 0, result.stderr
    by_host = {h["host"]: h for h in data["hosts"]}
    assert all(h["reachable"] for h in by_host.values())
    assert by_host[H2]["hostname"] == "spark-2" and by_host[H2]["management_ip"] == H2
    assert sorted(d["ipv4"] for d in by_host[H3]["infiniband"]) == [f"{ib_address(H3, 1)}/24", f"{ib_address(H3)}/24"]
    assert by_host[H1]["gpu"].startswith("NVIDIA GB10")
    assert [h.connection_count() for h in bed.bed.hosts] == [1, 1, 1]
    # A second command reuses the persistent masters: no new connection at all.
    status(bed, "-H", ALL)
    assert [h.connection_count() for h in bed.bed.hosts] == [1, 1, 1]


def test_status_with_a_host_down_reports_partial(bed):
    bed.bed.hosts[1].down()
    bed.bed.close_client_masters()
    result, data = status(bed, "-H", ALL)
    assert result.returncode == 3
    reach = {h["host"]: h["reachable"] for h in data["hosts"]}
    assert reach == {H1: True, H2: False, H3: True}
    text = bed("status", "-H", ALL, "--no-probe")
    assert text.returncode == 3 and "UNREACHABLE" in text.stdout and "spark-1" not in text.stderr
    line = next(l for l in text.stdout.splitlines() if l.startswith(H2))
    assert "cannot connect over ssh" in line


def test_status_uses_default_cluster_and_hosts_file(bed, tmp_path):
    bed("cluster", "create", "lab", "-H", f"{H1},{H2}", "--default", check=0)
    _, data = status(bed)
    assert [h["host"] for h in data["hosts"]] == [H1, H2]
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"# the lab\n{H3}\n\n{H1}   # head second\n")
    _, data = status(bed, "--hosts-file", hosts_file)
    assert [h["host"] for h in data["hosts"]] == [H3, H1]


def test_wrong_user_is_auth_refused(bed):
    result = bed("status", "-H", H1, "--user", "nosuchuser")
    assert result.returncode == 3
    data = json.loads(bed("status", "-H", H1, "--user", "nosuchuser", "--json").stdout)
    assert "ssh refused the login for user 'nosuchuser'" in data["hosts"][0]["error"]
    result = bed("logs", "qwen3-1.7b-vllm", "-H", H1, "--user", "nosuchuser")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: {H1}: ssh refused the login for user 'nosuchuser'; install your key "
                                     "(ssh-copy-id) or pass --user")


def test_bad_host_strings_are_rejected_before_any_ssh(bed):
    for host in bed.bed.hosts:
        host.reset_connections()
    for bad in ["a;b", "-oProxyCommand=x", "h1 h2", "$(id)"]:
        result = bed("status", f"--hosts={bad}")
        assert result.returncode == 2 and "invalid host" in result.stderr
    assert [h.connection_count() for h in bed.bed.hosts] == [0, 0, 0]


def test_docker_permission_is_explained(bed):
    bed.bed.hosts[0].fault("docker_permission")
    result = bed("stop", "--all", "-H", H1)
    assert result.returncode == 1
    assert "sudo usermod -aG docker $USER" in result.stderr and result.stderr.startswith(f"Error: {H1}: ")
    _, data = status(bed, "-H", H1)
    assert "permission denied" in data["hosts"][0]["docker_error"]


def test_a_login_shell_that_runs_nothing_is_an_error_not_an_empty_host(bed):
    """`nobody` may log in with the bed's key, but its shell is nologin: no facts came back."""
    result, data = status(bed, "-H", H1, "--user", "nobody")
    assert result.returncode == 3
    assert "did not run sparkrun's script" in data["hosts"][0]["error"]


def test_docker_missing_is_explained(bed):
    bed.bed.hosts[0].fault("no_docker")
    result = bed("stop", "--all", "-H", H1)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: {H1}: docker is not installed on this host; install Docker and "
                                     "the NVIDIA container toolkit")


def test_changed_host_key_is_named_with_the_fix(bed, tmp_path):
    """A host whose key is not the one known (reinstalled, or someone in the middle)."""
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"{H1} {(tmp_path / 'other_key.pub').read_text().split(' ', 2)[0]} "
                     f"{(tmp_path / 'other_key.pub').read_text().split(' ', 2)[1]}\n")
    config = tmp_path / "ssh_config"
    config.write_text(bed.bed.ssh_config.read_text().replace(str(bed.bed.known_hosts), str(known)))
    result = bed("stop", "--all", "-H", H1, env={"SPARKRUN_SSH_OPTS": f"-F {config}",
                                                  "SPARKRUN_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: {H1}: host key mismatch or unknown host key; if the host was "
                                     f"reinstalled, run: ssh-keygen -R {H1}")
