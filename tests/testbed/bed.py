"""TestBed: N simulated DGX Spark hosts reachable over real ssh on 127.0.0.x."""
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .fakedocker import procs
from .host import STASH, Host
from .meter import Meter


def keygen(path, comment):
    return subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                             "-f", str(path)], stdin=subprocess.DEVNULL)


def namespaces_work():
    """True if this process may create mount + UTS namespaces (needs root)."""
    try:
        return subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class TestBed:
    """Simulated hosts spark-1..N at 127.0.0.<first_octet>.. (see the package docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir, n_hosts=3, first_octet=11):
        self.workdir = Path(workdir).resolve()
        self.token = os.urandom(8).hex()
        self.isolated = None
        self.client_dir = self.workdir / "client"
        self.client_key = self.client_dir / "id_ed25519"
        self.known_hosts = self.client_dir / "known_hosts"
        self.ssh_config = self.client_dir / "ssh_config"
        self.control_home = None
        self.hosts = [Host(self, i, f"127.0.0.{first_octet + i - 1}")
                      for i in range(1, n_hosts + 1)]
        self.meter = Meter([self.workdir / "meter"] + [h.meter_dir for h in self.hosts])
        self.started = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def host(self, key):
        """Host by number (1-based), id ('spark-2') or address."""
        for host in self.hosts:
            if key in (host.number, host.id, host.addr):
                return host
        raise KeyError(key)

    # -- lifecycle -----------------------------------------------------------
    def start(self):
        """Create keys, configs and state, then start every host's sshd."""
        self.isolated = namespaces_work()
        for needed in ("/run/sshd", STASH):
            Path(needed).mkdir(parents=True, exist_ok=True)
        self.client_dir.mkdir(parents=True, exist_ok=True)
        self.control_home = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
        self.started = True
        atexit.register(self.stop)
        try:
            self._setup()
            for host in self.hosts:
                host.up(wait=False)
            for host in self.hosts:
                host.wait_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _setup(self):
        for sub in (".config", ".cache", ".ssh"):
            (self.control_home / sub).mkdir()
        self._make_keys()
        client_pub = self.client_key.with_suffix(".pub").read_text()
        for host in self.hosts:
            host.prepare(client_pub)
        self.write_addrmaps()
        self._write_client_config()

    def _make_keys(self):
        jobs = [keygen(self.client_key, "testbed-client")]
        for host in self.hosts:
            host.sshd_dir.mkdir(parents=True, exist_ok=True)
            jobs.append(keygen(host.sshd_dir / "host_ed25519", host.id))
        if any(job.wait() != 0 for job in jobs):
            raise RuntimeError("ssh-keygen failed")

    def _write_client_config(self):
        lines = []
        for host in self.hosts:
            key = " ".join((host.sshd_dir / "host_ed25519.pub").read_text().split()[:2])
            lines += [f"{host.addr} {key}", f"{host.id} {key}"]
        self.known_hosts.write_text("\n".join(lines) + "\n")
        aliases = [f"Host {h.id}\n  HostName {h.addr}\n" for h in self.hosts]
        self.ssh_config.write_text("".join(aliases) + "\n".join([
            "Host 127.0.0.* spark-*", "  User root", f"  IdentityFile {self.client_key}",
            "  IdentitiesOnly yes", f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null", "  StrictHostKeyChecking yes",
            "  BatchMode yes", "  ConnectTimeout 5", "  LogLevel ERROR", ""]))

    def stop(self):
        """Stop every sshd and every process started on the hosts (by PID)."""
        if not self.started:
            return
        self.started = False
        atexit.unregister(self.stop)
        for host in self.hosts:
            host.down()
        marked = [p for p in procs.marked(f"TESTBED_RUN={self.token}".encode())
                  if p != os.getpid()]
        for host in self.hosts:
            marked += host.processes_alive()
        procs.signal_all(marked, signal.SIGTERM)
        procs.signal_all(procs.wait_gone(marked, 1.0), signal.SIGKILL)
        procs.wait_gone(marked, 2.0)
        shutil.rmtree(self.control_home, ignore_errors=True)

    def close_client_masters(self):
        """Kill ControlPersist ssh masters whose socket lives in control_home
        (a master rewrites its title, e.g. 'ssh: <ControlPath> [mux]')."""
        masters = [p for p in procs.all_pids() if procs.read_proc(p, "comm") == "ssh"
                   and str(self.control_home) in procs.read_proc(p, "cmdline")]
        procs.terminate(masters, 0.5)

    def reset(self, images=False):
        """Make every host fresh again (see Host.reset); drop ssh masters and the byte counts."""
        self.close_client_masters()
        for host in self.hosts:
            host.reset(images=images)
        self.write_addrmaps()
        self.meter.reset()

    def transfers(self):
        """Every ssh connection since the last reset that carried bytes (meter.py): dicts with
        from (the address it came from, "control" for this machine), to, sent, received."""
        return self.meter.transfers()

    # -- helpers -------------------------------------------------------------
    def write_addrmaps(self):
        """Tell every host which loopback address stands for each fake IB IP."""
        mapping = {ip: host.addr for host in self.hosts for ip in host.addresses()}
        for host in self.hosts:
            host.write_addrmap(mapping)

    def cable(self, *links):
        """Cables between CX7 ports, each (host, port, host, port) with ports 0/1 of
        facts.SPARK_PORTS (give the hosts facts.spark_ports first). An all-nodes ping on a
        netdev of a cabled port then answers from both ends' netdevs (a port's twins share
        its cable), as on a real link."""
        answers = {}
        for a, a_port, b, b_port in links:
            a, b = self.host(a), self.host(b)
            on_link = sorted({**a.port_link_locals(a_port), **b.port_link_locals(b_port)}.values())
            for host, port in ((a, a_port), (b, b_port)):
                for netdev in host.port_link_locals(port):
                    answers.setdefault(host, {})[netdev] = on_link
        for host in self.hosts:
            host.write_links(answers.get(host, {}))

    def env(self):
        """Environment variables for running sparkrun against the bed
        (merge into os.environ)."""
        home = self.control_home
        return {"SPARKRUN_SSH_OPTS": f"-F {self.ssh_config}", "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
                "TESTBED_RUN": self.token, "TESTBED_METER_DIR": str(self.workdir / "meter")}

    def client_env(self):
        """Full environment for ssh clients run by the bed itself."""
        return {**os.environ, **self.env()}

    def ssh_command(self, host):
        """argv prefix to reach a host: ['ssh', '-F', cfg, addr]."""
        return ["ssh", "-F", str(self.ssh_config), self.host(host).addr]

    def add_image(self, name, size_bytes=1024, hosts=None, **kwargs):
        """Add the same image (same id) to the given hosts (default: all)."""
        targets = [self.host(h) for h in hosts] if hosts else self.hosts
        return [h.add_image(name, size_bytes, **kwargs) for h in targets][0]
