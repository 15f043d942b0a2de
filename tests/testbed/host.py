"""One simulated DGX Spark: an sshd in its own mount/UTS namespace plus state."""
import json
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from . import facts
from .fakedocker import procs
from .fakedocker.store import Store, normalize_ref, payload_chunks

HERE = Path(__file__).resolve().parent
HOST_TOOLS = ("docker", "ip", "nvidia-smi", "ping", "df", "ssh")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STASH = Path("/mnt")  # mount point used briefly inside the namespace


class Host:
    """A simulated host. `root` is its state dir on the control side."""

    def __init__(self, bed, number, addr):
        self.bed, self.number, self.addr = bed, number, addr
        self.id = f"spark-{number}"
        self.root = bed.workdir / "hosts" / self.id
        self.home, self.tmp, self.bin = self.root / "home", self.root / "tmp", self.root / "bin"
        self.sshd_dir = self.root / "sshd"
        self.meter_dir = self.root / "meter"  # its ssh connections' byte counts (meter.py)
        self.dev_shm = self.root / "dev-shm"  # its /dev/shm: what containers with --ipc host leave there
        self.log = self.sshd_dir / "sshd.log"
        self.store = None
        self._ib = facts.normalize_ib(facts.default_ib(addr))
        self._gpu = dict(facts.DEFAULT_GPU)
        self._memory = dict(facts.DEFAULT_MEMORY)
        self._sshd = None
        self._conn_base = 0
        self._listening_before = 0

    def __repr__(self):
        return f"<Host {self.id} {self.addr}>"

    # -- setup -------------------------------------------------------------
    def prepare(self, client_key_pub):
        """Create the state dirs, tools, facts and sshd config."""
        for sub in (self.home, self.tmp, self.bin, self.sshd_dir, self.root / "faults",
                    self.root / "etc" / "netplan"):
            sub.mkdir(parents=True, exist_ok=True)
        # The host's own copy of the stand-ins: the checkout may sit under /tmp or /root, which
        # the host's namespace replaces with its private ones.
        code = self.root / "testbed"
        for part in ("hostbin", "fakedocker", "engines"):
            shutil.copytree(HERE / part, code / part, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        for tool in HOST_TOOLS:
            (self.bin / tool).symlink_to(code / "hostbin" / tool)
        self.store = Store(self.root)
        (self.sshd_dir / "authorized_keys").write_text(client_key_pub)
        self.sshd_dir.joinpath("sshd_config").write_text(self._sshd_config())
        self._write_facts()

    def _sshd_config(self):
        env = {"PATH": f"{self.bin}:{SYSTEM_PATH}", "TESTBED_HOST_ADDR": self.addr,
               "TESTBED_HOST_ID": self.id, "TESTBED_STATE": str(self.root),
               "SPARKRUN_SYSFS": str(self.root / "sysfs"), "TESTBED_RUN": self.bed.token,
               # setup cx7 / clear-cache write these instead of the machine's real files.
               "SPARKRUN_NETPLAN_DIR": str(self.root / "etc" / "netplan"),
               "SPARKRUN_DROP_CACHES": str(self.root / "drop_caches"),
               "TESTBED_METER_DIR": str(self.meter_dir),
               "SPARKRUN_MEMINFO": str(self.root / "meminfo")}
        if not self.bed.isolated:
            env.update(HOME=str(self.home), TMPDIR=str(self.tmp))
        # With a private /root, the host's own ~/.ssh/authorized_keys counts too (setup ssh
        # fills it); without one, %h would be the real /root, so only the bed's file counts.
        keys = f"{self.sshd_dir / 'authorized_keys'}" + (" .ssh/authorized_keys" if self.bed.isolated else "")
        setenv = " ".join(f'"{k}={v}"' for k, v in env.items())
        listen = [f"ListenAddress {address}:22" for address in self.ssh_addresses()]
        return "\n".join([
            *listen,
            f"HostKey {self.sshd_dir / 'host_ed25519'}",
            "PidFile none", "UsePAM no", "PermitRootLogin prohibit-password",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {keys}",
            "LogLevel VERBOSE", "UseDNS no", "MaxStartups 64", "PrintMotd no",
            "PrintLastLog no", "X11Forwarding no", "Subsystem sftp internal-sftp",
            f"SetEnv {setenv}", ""])

    def _sshd_command(self):
        sshd = ["/usr/sbin/sshd", "-D", "-E", str(self.log),
                "-f", str(self.sshd_dir / "sshd_config")]
        if not self.bed.isolated:
            return sshd
        root = shlex.quote(str(self.root))
        script = "; ".join([
            "set -e", f"hostname {self.id}", f"mount --bind {root} {STASH}",
            f"mount --bind {STASH}/tmp /tmp", f"mount --bind {STASH}/home /root",
            f"mkdir -p {root}", f"mount --bind {STASH} {root}", f"umount {STASH}",
            "exec " + shlex.join(sshd)])
        return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script]

    # -- sshd --------------------------------------------------------------
    def up(self, wait=True):
        """Start this host's sshd (no-op if it runs)."""
        if self.is_up:
            return
        self._listening_before = self._log_count("Server listening on ")
        env = {"PATH": SYSTEM_PATH, "TESTBED_RUN": self.bed.token, "TESTBED_HOST_ID": self.id}
        with open(self.sshd_dir / "stderr.log", "ab") as err:
            self._sshd = subprocess.Popen(self._sshd_command(), env=env, stdin=subprocess.DEVNULL,
                                          stdout=err, stderr=err)
        if wait:
            self.wait_up()

    def wait_up(self, timeout=10):
        """Wait for sshd to log that it listens (no probe connection is made)."""
        deadline = time.monotonic() + timeout
        while self._log_count("Server listening on ") <= self._listening_before:
            if self._sshd.poll() is not None or time.monotonic() > deadline:
                self.down()
                log = "".join(p.read_text() for p in (self.sshd_dir / "stderr.log", self.log)
                              if p.exists())
                raise RuntimeError(f"sshd for {self.id} on {self.addr}:22 did not start:\n{log}")
            time.sleep(0.01)

    def down(self):
        """Stop this host's sshd and its sessions: the host becomes unreachable."""
        if self._sshd is None:
            return
        pids = [self._sshd.pid] + procs.descendants(self._sshd.pid)
        procs.terminate(pids, grace=0.5)
        self._sshd.wait()
        self._sshd = None

    @property
    def is_up(self):
        return self._sshd is not None and self._sshd.poll() is None

    # -- talking to the host -----------------------------------------------
    def ssh(self, command, input=None, timeout=60, check=False, options=()):
        """Run a shell command on the host through real ssh (text mode)."""
        argv = ["ssh", "-F", str(self.bed.ssh_config), *options, self.addr, command]
        return subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, check=check, env=self.bed.client_env())

    def wait_http(self, port, path="/v1/models", timeout=15):
        """Poll http://<addr>:<port><path> until it answers 200; return its JSON."""
        url = f"http://{self.addr}:{port}{path}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return json.loads(response.read() or b"null")
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready after {timeout}s")
                time.sleep(0.05)

    def connection_count(self):
        """TCP connections sshd accepted since start or reset_connections()."""
        return self._connections_logged() - self._conn_base

    def reset_connections(self):
        self._conn_base = self._connections_logged()

    def _connections_logged(self):
        return self._log_count("Connection from ")

    def _log_count(self, text):
        if not self.log.exists():
            return 0
        return self.log.read_text().count(text)

    def path(self, host_path):
        """Control-side path of an absolute path as seen on the host."""
        for prefix, local in (("/root", self.home), ("/tmp", self.tmp)):
            if host_path == prefix or host_path.startswith(prefix + "/"):
                return local / host_path[len(prefix):].lstrip("/")
        return Path(host_path)

    # -- facts and faults ----------------------------------------------------
    def _write_facts(self):
        facts.write_facts(self.root, self.number, self.addr, self._ib, self._gpu, self._memory)

    def set_ib(self, entries=None):
        """Replace the RoCE/IB ports: None = DGX Spark default, [] = none.

        Entry keys: hca, netdev, ipv4, prefix (24), state ("ACTIVE"/"DOWN"),
        gid_index (3), mtu (9000).
        """
        self._ib = facts.normalize_ib(facts.default_ib(self.addr) if entries is None else entries)
        self._write_facts()
        self.bed.write_addrmaps()

    def ib(self):
        return [dict(e) for e in self._ib]

    def port_link_locals(self, port):
        """IPv6 link-local addresses of the netdevs of CX7 port `port` (facts.SPARK_PORTS)."""
        names = {netdev for _, netdev, _ in facts.SPARK_PORTS[port]}
        return {e["netdev"]: facts.link_local(facts.mac_address(self.number, i))
                for i, e in enumerate(self._ib, start=1) if e["netdev"] in names}

    def write_links(self, links):
        """facts/links.json: netdev -> link-local addresses answering on its cable."""
        (self.root / "facts" / "links.json").write_text(json.dumps(links))

    def set_gpu(self, name="NVIDIA GB10", memory_mib=122572, count=1, free_mib=None, unified_memory=True):
        """free_mib: GPU memory free to an engine (less when the page cache holds more)."""
        self._gpu = dict(facts.DEFAULT_GPU, name=name, memory_mib=memory_mib, count=count,
                         unified_memory=unified_memory)
        if free_mib is not None:
            self._gpu["free_mib"] = free_mib
        self._write_facts()

    def set_memory(self, available_kib=None, total_kib=None):
        """MemAvailable (before GPU processes take their share) and MemTotal; None: a Spark's."""
        self._memory = {"total_kib": total_kib or facts.DEFAULT_MEMORY["total_kib"],
                        "available_kib": available_kib or facts.DEFAULT_MEMORY["available_kib"]}
        self._write_facts()

    def block_drop_caches(self, blocked=True):
        """Make writing drop_caches fail even for root, as on a host whose /proc/sys is mounted
        read-only (tee: /proc/sys/vm/drop_caches: Read-only file system)."""
        target = self.root / "drop_caches"
        if target.is_dir():
            target.rmdir()
        else:
            target.unlink(missing_ok=True)
        if blocked:
            target.mkdir()

    def fault(self, name, value=True):
        """Set faults/<name> (value False/None clears it)."""
        path = self.root / "faults" / name
        if value is False or value is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text("1" if value is True else str(value))

    def clear_faults(self):
        for path in (self.root / "faults").iterdir():
            path.unlink()

    # -- docker state ----------------------------------------------------------
    def docker_calls(self):
        """argv (without 'docker') of every docker stand-in call, in order."""
        return [call["argv"] for call in self.store.calls()]

    def clear_docker_calls(self):
        self.store.clear_calls()

    def containers(self):
        """Containers the stand-in knows, newest first."""
        out = []
        for c in self.store.containers():
            state = self.store.state(c)
            out.append({"id": c["Id"], "name": c["Name"], "image": c["Image"],
                        "image_id": c["ImageID"], "running": state["Running"],
                        "status": state["Status"], "exit_code": state["ExitCode"],
                        "pid": c.get("Pid"), "labels": c["Labels"], "env": c["Env"],
                        "command": [c["Path"]] + c["Args"], "mounts": c["Mounts"],
                        "host_config": c["HostConfig"]})
        return out

    def container_log(self, name):
        container = self.store.find_container(name)
        return Path(self.store.log_path(container)).read_text() if container else None

    def container_env(self, name):
        """The real environment of a running container, read on the host (`docker exec env`)."""
        result = self.ssh(f"docker exec {shlex.quote(name)} env", check=True)
        return dict(line.partition("=")[::2] for line in result.stdout.splitlines() if "=" in line)

    def processes_alive(self):
        """Live processes started by fake containers on this host."""
        pids = set(procs.marked(f"TESTBED_RUN={self.bed.token}".encode(),
                                f"TESTBED_HOST_ID={self.id}".encode(),
                                prefix=b"TESTBED_CONTAINER="))
        for container in self.store.containers():
            pids.update(self.store.container_pids(container))
        return sorted(pids)

    def kill_containers(self):
        """Kill every container process and forget all containers."""
        procs.terminate(self.processes_alive(), grace=0.5)
        for container in self.store.containers():
            self.store.delete_container(container)

    def add_image(self, name, size_bytes=1024, image_id=None, entrypoint=None, cmd=None,
                  env=None, registry=False, arch="arm64"):
        """Create an image locally (or in the host's fake registry); returns its id.

        The payload is derived from name, size and architecture, so the same call on two
        hosts gives the same id. entrypoint/cmd are lists, env a dict.
        """
        return install_image(self.store, name, size_bytes, image_id=image_id, entrypoint=entrypoint,
                             cmd=cmd, env=env, registry=registry, arch=arch)

    def add_registry_image(self, name, **kwargs):
        """An image `docker pull` on this host can fetch."""
        return self.add_image(name, registry=True, **kwargs)

    def images(self):
        return [{"id": i["Id"], "tags": i["RepoTags"], "size": i["Size"],
                 "arch": i.get("Architecture", "arm64")} for i in self.store.images()]

    def reset(self, images=False):
        """Back to a fresh host (containers, faults, calls, facts; images optional)."""
        self.kill_containers()
        self.clear_faults()
        self.clear_docker_calls()
        self._ib = facts.normalize_ib(facts.default_ib(self.addr))
        self._gpu = dict(facts.DEFAULT_GPU)
        self._memory = dict(facts.DEFAULT_MEMORY)
        self.block_drop_caches(False)
        shutil.rmtree(self.root / "gpu_processes", ignore_errors=True)
        shutil.rmtree(self.dev_shm, ignore_errors=True)
        self._write_facts()
        (self.root / "facts" / "links.json").unlink(missing_ok=True)
        if images:
            for folder in ("images", "registry"):
                shutil.rmtree(Path(self.store.dir, folder))
                Path(self.store.dir, folder).mkdir()
            self.use_containerd_store(False)
        self._clear_private_dirs()
        self.reset_connections()
        if not self.is_up:
            self.up()

    def _clear_private_dirs(self):
        """Empty the host's /root and /tmp, sparing the path that re-exposes
        the state dir inside the namespace (when the bed lives under them)."""
        for path, prefix in ((self.home, "/root"), (self.tmp, "/tmp")):
            inside = self.root.is_relative_to(prefix)
            keep = self.root.parts[len(Path(prefix).parts)] if inside else None
            for child in path.iterdir():
                if child.name == keep:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    def addresses(self):
        """Fake IB IPv4 addresses of this host (for the bed's address map)."""
        return [e["ipv4"] for e in self.ib() if e["ipv4"]]

    def ssh_addresses(self):
        """Where this host takes ssh logins: its management address and the CX7 addresses
        it starts with (as a Spark's sshd listens on every interface)."""
        return [self.addr] + [e["ipv4"] for e in facts.normalize_ib(facts.default_ib(self.addr))]

    def use_containerd_store(self, enabled=True):
        """Switch this host's docker to the containerd image store (or back to overlay2)."""
        config = Path(self.store.dir) / "daemon.json"
        if enabled:
            config.write_text(json.dumps({"features": {"containerd-snapshotter": True}}))
        else:
            config.unlink(missing_ok=True)

    def write_addrmap(self, mapping):
        (self.root / "addrmap.json").write_text(json.dumps(mapping))


def install_image(store, name, size_bytes=1024, image_id=None, entrypoint=None, cmd=None, env=None,
                  registry=False, arch="arm64"):
    """An image in a docker stand-in's store (a host's or the control machine's); returns its id.
    Each architecture of a name has its own content, as the variants of a multi-arch image do."""
    meta = {"RepoTags": [normalize_ref(name)], "Entrypoint": entrypoint,
            "Cmd": cmd if cmd is not None else ["/bin/bash"],
            "Env": [f"{k}={v}" for k, v in (env or {}).items()], "Architecture": arch}
    if image_id:
        meta["Id"] = image_id if image_id.startswith("sha256:") else "sha256:" + image_id
    content = name if arch == "arm64" else f"{name}@{arch}"
    return store.install_image(meta, payload_chunks(content, size_bytes), registry)["Id"]
