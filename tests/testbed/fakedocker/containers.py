"""Container commands: run, ps, inspect, logs, rm, stop, kill, exec."""
# What only some commands need is imported inside them, and paths are plain strings (pathlib
# would double the start-up): `ps` runs on every sparkrun status.
import json
import os
import re
import signal
import sys
import time
from os.path import basename, dirname, exists, join, realpath

from . import procs
from .args import parse, spec
from .common import (DockerError, ago, created_at, daemon_error, human_duration,
                     iso_time, print_formatted, print_table)
from .store import mask_env, random_name, read_text

TESTBED = dirname(dirname(realpath(__file__)))
ENGINE_BIN = join(TESTBED, "engines", "bin")
ENGINE_PY = join(TESTBED, "engines", "py")
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_THROUGH = ("TESTBED_STATE", "TESTBED_HOST_ADDR", "TESTBED_HOST_ID",
                "TESTBED_RUN", "SPARKRUN_SYSFS")

RUN_SPEC = spec(
    bools="d,detach rm privileged init i,interactive t,tty P,publish-all read-only",
    values="name network,net gpus ipc shm-size w,workdir entrypoint runtime "
           "h,hostname u,user restart pid pull platform m,memory cpus stop-signal "
           "stop-timeout cgroupns uts log-driver",
    lists="e,env env-file l,label v,volume p,publish ulimit cap-add cap-drop device "
          "security-opt add-host mount log-opt group-add tmpfs sysctl dns")
PS_SPEC = spec(bools="a,all q,quiet no-trunc s,size l,latest",
               values="format n,last", lists="f,filter")
INSPECT_SPEC = spec(bools="s,size", values="f,format type")
LOGS_SPEC = spec(bools="f,follow", values="n,tail")
RM_SPEC = spec(bools="f,force v,volumes")
STOP_SPEC = spec(values="t,time,timeout s,signal")
KILL_SPEC = spec(values="s,signal")
EXEC_SPEC = spec(bools="d,detach i,interactive t,tty privileged",
                 values="w,workdir u,user", lists="e,env env-file")
PS_HEADERS = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND",
              "RunningFor": "CREATED", "CreatedAt": "CREATED AT", "Status": "STATUS",
              "Ports": "PORTS", "Names": "NAMES", "State": "STATE", "Labels": "LABELS"}
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


def must_find(store, ref):
    container = store.find_container(ref)
    if not container:
        raise daemon_error(f"No such container: {ref}")
    return container


# -- run ---------------------------------------------------------------------
def read_env_file(path):
    try:
        lines = read_text(path).splitlines()
    except OSError:
        raise DockerError(f"docker: open {path}: no such file or directory.", 125)
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def user_env(items, env_files, base=()):
    """Environment from base ('K=V' list, e.g. the image's), then --env-file,
    then -e (K=V, or K taken from the caller's environment)."""
    env = {}
    for item in list(base) + [i for f in env_files for i in read_env_file(f)] + items:
        key, eq, value = item.partition("=")
        if eq:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def host_dev_shm():
    """The simulated host's /dev/shm (a folder of its state)."""
    return join(os.environ.get("TESTBED_STATE", "/nonexistent"), "dev-shm")


def process_env(container_id, hostname, env, mounts, ipc):
    """What the container's processes see: fake engines first on PATH; with --ipc host, the
    host's /dev/shm as TESTBED_DEV_SHM. A private IPC namespace has a /dev/shm of its own, which
    docker unmounts with the container however it ends, so nothing of it is modelled."""
    out = {"PATH": STD_PATH, "HOSTNAME": hostname, "HOME": "/root"}
    out.update(env)
    out["PATH"] = f"{ENGINE_BIN}:{out['PATH']}"
    out["PYTHONPATH"] = ":".join(filter(None, [ENGINE_PY, env.get("PYTHONPATH")]))
    out.update({k: os.environ[k] for k in PASS_THROUGH if k in os.environ})
    out["TESTBED_CONTAINER"] = container_id
    out["TESTBED_MOUNTS"] = json.dumps({m["Destination"]: m["Source"] for m in mounts})
    if ipc == "host":
        out["TESTBED_DEV_SHM"] = host_dev_shm()
    return out


def parse_mounts(store, volumes, mount_specs):
    mounts = []
    for item in volumes:
        src, _, rest = item.partition(":")
        dst, _, mode = rest.partition(":")
        if not dst:
            src, dst = "", src
        kind = "bind" if src.startswith("/") else "volume"
        if kind == "volume":
            src = join(store.dir, "volumes", src or os.urandom(8).hex())
        if kind == "volume" or src.startswith(("/root", "/tmp")):
            os.makedirs(src, exist_ok=True)
        mounts.append({"Type": kind, "Source": src, "Destination": dst,
                       "Mode": mode, "RW": "ro" not in mode.split(",")})
    for item in mount_specs:
        fields = dict(p.partition("=")[::2] for p in item.split(","))
        mounts.append({"Type": fields.get("type", "volume"),
                       "Source": fields.get("source", fields.get("src", "")),
                       "Destination": fields.get("target", fields.get("dst", "")),
                       "Mode": "", "RW": "readonly" not in fields})
    return mounts


def command_of(opts, image, args):
    """ENTRYPOINT + arguments, as docker builds them: the run arguments replace the image's
    CMD; --entrypoint replaces ENTRYPOINT and drops CMD ("" leaves no entrypoint).
    https://docs.docker.com/reference/dockerfile/#understand-how-cmd-and-entrypoint-interact"""
    if opts["entrypoint"] is not None:
        entry = [opts["entrypoint"]] if opts["entrypoint"] else []
        return entry + args
    return (image.get("Entrypoint") or []) + (args or image.get("Cmd") or [])


def image_file(path):
    """A program an image has at an absolute path (/app/llama-server, /opt/nvidia/
    nvidia_entrypoint.sh): the stand-in of that name in engines/bin, which plays the
    image's file system; other paths are the host's own."""
    stand_in = join(ENGINE_BIN, basename(path))
    return stand_in if path.startswith("/") and not exists(path) and exists(stand_in) else path


def new_container(store, opts, image, ref, argv, env, mounts):
    cid = store.new_container_id()
    name = opts["name"] or random_name()
    if not NAME_RE.fullmatch(name):
        raise daemon_error(f"Invalid container name ({name}), only "
                           "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed.", 125)
    hostname = opts["hostname"] or (os.environ.get("TESTBED_HOST_ID", "localhost")
                                    if opts["network"] == "host" else cid[:12])
    return {
        "Id": cid, "Name": name, "Image": ref, "ImageID": image["Id"],
        "Created": time.time(), "Path": argv[0], "Args": argv[1:],
        "Entrypoint": argv[:1] if opts["entrypoint"] else image.get("Entrypoint"),
        "Cmd": argv[1:] if opts["entrypoint"] else argv, "Hostname": hostname,
        "Labels": dict(item.partition("=")[::2] for item in opts["label"]),
        "Env": {k: mask_env(k, v) for k, v in env.items()},
        "WorkingDir": opts["workdir"] or "", "Mounts": mounts,
        "AutoRemove": opts["rm"],
        "HostConfig": {
            "NetworkMode": opts["network"] or "bridge", "IpcMode": opts["ipc"] or "private",
            "ShmSize": opts["shm_size"], "Privileged": opts["privileged"],
            "Init": opts["init"], "Runtime": opts["runtime"] or "runc",
            "Gpus": opts["gpus"], "Ulimits": opts["ulimit"], "CapAdd": opts["cap_add"],
            "Devices": opts["device"], "PortBindings": opts["publish"],
            "RestartPolicy": {"Name": opts["restart"] or "no"},
            "Binds": opts["volume"], "AutoRemove": opts["rm"]},
    }


def foreign_platform(store, image, argv):
    """An image of another architecture (no emulation on the host): docker warns, and the
    container's first program fails with "exec format error" and exit 1 (moby/moby#33428,
    e.g. "exec /bin/bash: exec format error")."""
    arch = image.get("Architecture", "arm64")
    if arch == store.daemon_arch():
        return argv
    host = "linux/arm64/v8" if store.daemon_arch() == "arm64" else f"linux/{store.daemon_arch()}"
    print(f"WARNING: The requested image's platform (linux/{arch}) does not match the detected host "
          f"platform ({host}) and no specific platform was requested", file=sys.stderr)
    return ["/bin/sh", "-c", f"echo 'exec {argv[0]}: exec format error' >&2; exit 1"]


def check_gpus(opts):
    if not opts["gpus"]:
        return
    facts = join(os.environ.get("TESTBED_STATE", "/nonexistent"), "facts", "gpu.json")
    gpu = json.loads(read_text(facts)) if exists(facts) else {"count": 1}
    if gpu.get("count", 1) < 1:
        raise daemon_error('could not select device driver "" with capabilities: [[gpu]]', 125)


def cmd_run(store, args):
    try:
        return _run(store, args)
    except DockerError as exc:
        if str(exc).startswith("Error response from daemon"):
            raise DockerError(f"docker: {exc}.\nSee 'docker run --help'.", exc.code) from exc
        raise


def _run(store, args):
    opts, pos = parse(args, RUN_SPEC, interspersed=False)
    if not pos:
        raise DockerError('"docker run" requires at least 1 argument.', 1)
    fault = store.fault("docker_run_fail")
    if fault is not None:
        raise daemon_error(fault if fault not in ("", "1", "True") else
                           "failed to create task for container: failed to create shim task: "
                           "OCI runtime create failed: nvidia-container-cli: initialization "
                           "error: nvml error: driver not loaded: unknown", 125)
    from . import images, launch

    ref, cmd_args = pos[0], pos[1:]
    image = images.ensure_local(store, ref, opts["pull"] or "missing")
    check_gpus(opts)
    argv = command_of(opts, image, cmd_args)
    if not argv:
        raise daemon_error("no command specified", 125)
    env = user_env(opts["env"], opts["env_file"], image.get("Env") or [])
    slow = store.fault("docker_run_slow")
    if slow is not None:
        # The CLI has read its --env-file by now (docker/cli cli/command/container/opts.go parses
        # it with the other options); the daemon may then take long to create the container.
        time.sleep(float(slow or 5))
    mounts = parse_mounts(store, opts["volume"], opts["mount"])
    container = new_container(store, opts, image, ref, argv, env, mounts)
    with store.lock():
        other = store.find_container(container["Name"])
        if other and other["Name"] == container["Name"]:
            raise daemon_error(
                f'Conflict. The container name "/{container["Name"]}" is already in use by '
                f'container "{other["Id"]}". You have to remove (or rename) that container '
                "to be able to reuse that name", 125)
        store.save_container(container)
    open(store.log_path(container), "a").close()
    penv = process_env(container["Id"], container["Hostname"], env, mounts, opts["ipc"])
    workdir = opts["workdir"] if opts["workdir"] and os.path.isdir(opts["workdir"]) else "/"
    argv = foreign_platform(store, image, [image_file(argv[0])] + argv[1:])
    if opts["detach"]:
        launch.start(store, container, argv, penv, workdir)
        print(container["Id"])
        return 0
    with open(store.log_path(container), "rb") as log:
        pid = launch.start(store, container, argv, penv, workdir)
        return follow(log, lambda: procs.alive(pid), lambda: False, exit_of=pid)


# -- ps / inspect ------------------------------------------------------------
def parse_filters(items):
    filters = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in ("label", "name", "id", "status", "ancestor"):
            raise daemon_error(f"invalid filter '{key}'")
        filters.setdefault(key, []).append(value)
    return filters


def label_matches(labels, want):
    key, eq, value = want.partition("=")
    return key in labels and (not eq or labels[key] == value)


def matches(container, state, filters):
    checks = {
        "label": lambda v: label_matches(container["Labels"], v),
        "name": lambda v: re.search(v, container["Name"]) is not None,
        "id": lambda v: container["Id"].startswith(v),
        "status": lambda v: state["Status"] == v,
        "ancestor": lambda v: v in (container["Image"], container["ImageID"]),
    }
    for key, values in filters.items():
        combine = all if key == "label" else any
        if not combine(checks[key](v) for v in values):
            return False
    return True


def status_text(container, state):
    if state["Status"] == "running":
        return "Up " + human_duration(time.time() - (container.get("Started") or time.time()))
    if state["Status"] == "exited":
        return f"Exited ({state['ExitCode']}) " + ago(state["FinishedAt"] or container["Created"])
    return "Created"


def ps_row(container, state, trunc=True):
    """One container in `docker ps --format '{{json .}}'` shape."""
    command = " ".join([container["Path"]] + container["Args"])
    if trunc and len(command) > 20:
        command = command[:19] + "…"
    return {
        "Command": f'"{command}"', "CreatedAt": created_at(container["Created"]),
        "ID": container["Id"][:12] if trunc else container["Id"],
        "Image": container["Image"],
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(container["Labels"].items())),
        "LocalVolumes": str(sum(m["Type"] == "volume" for m in container["Mounts"])),
        "Mounts": ",".join(m["Source"] for m in container["Mounts"]),
        "Names": container["Name"],
        "Networks": container["HostConfig"]["NetworkMode"], "Ports": "",
        "RunningFor": ago(container["Created"]), "Size": "0B",
        "State": state["Status"], "Status": status_text(container, state),
    }


def ps_methods(row):
    """Template methods of a ps row: {{.Label "key"}}."""
    labels = dict(item.partition("=")[::2] for item in row["Labels"].split(",") if item)
    return {"Label": lambda key: labels.get(key, "")}


def cmd_ps(store, args):
    opts, pos = parse(args, PS_SPEC)
    if pos:
        raise DockerError('"docker ps" accepts no arguments.', 1)
    filters = parse_filters(opts["filter"])
    found = []
    for container in store.containers():
        state = store.state(container)
        if (opts["all"] or state["Running"]) and matches(container, state, filters):
            found.append(ps_row(container, state, not opts["no_trunc"]))
    if opts["quiet"]:
        for row in found:
            print(row["ID"])
    elif opts["format"]:
        print_formatted(found, opts["format"], PS_HEADERS, ps_methods)
    else:
        keys = ["ID", "Image", "Command", "RunningFor", "Status", "Ports", "Names"]
        print_table([[PS_HEADERS[k] for k in keys]] + [[r[k] for k in keys] for r in found])
    return 0


def inspect_obj(store, container):
    """One container in `docker inspect` shape (env values of secrets masked)."""
    state = store.state(container)
    state.update(StartedAt=iso_time(state["StartedAt"]), FinishedAt=iso_time(state["FinishedAt"]))
    return {
        "Id": container["Id"], "Created": iso_time(container["Created"]),
        "Path": container["Path"], "Args": container["Args"], "State": state,
        "Image": container["ImageID"], "Name": "/" + container["Name"],
        "RestartCount": 0, "Driver": "overlay2", "Platform": "linux",
        "LogPath": store.log_path(container),
        "HostConfig": container["HostConfig"], "Mounts": container["Mounts"],
        "Config": {
            "Hostname": container["Hostname"],
            "Env": [f"{k}={v}" for k, v in container["Env"].items()],
            "Cmd": container["Cmd"], "Image": container["Image"],
            "WorkingDir": container["WorkingDir"], "Entrypoint": container["Entrypoint"],
            "Labels": container["Labels"]},
        "NetworkSettings": {"Networks": {container["HostConfig"]["NetworkMode"]: {}}},
    }


def cmd_inspect(store, args):
    opts, pos = parse(args, INSPECT_SPEC)
    if not pos:
        raise DockerError('"docker inspect" requires at least 1 argument.', 1)
    found, missing = [], []
    for ref in pos:
        container = store.find_container(ref) if opts["type"] != "image" else None
        image = store.find_image(ref) if not container and opts["type"] != "container" else None
        if container:
            found.append(inspect_obj(store, container))
        elif image:
            from . import images

            found.append(images.inspect_obj(store, image))
        else:
            missing.append(ref)
    if opts["format"]:
        print_formatted(found, opts["format"], {})
    else:
        print(json.dumps(found, indent=4))
    if missing:
        raise DockerError("\n".join(f"Error: No such object: {m}" for m in missing))
    return 0


# -- logs ----------------------------------------------------------------------
def follow(log, running, removed, exit_of=None):
    """Copy the log to stdout until `running()` turns false; return exit code."""
    out = sys.stdout.buffer
    while True:
        still = running()
        chunk = log.read()
        if chunk:
            out.write(chunk)
            out.flush()
        if not still or removed():
            break
        if not chunk:
            time.sleep(0.1)
    out.write(log.read())
    out.flush()
    if exit_of is None:
        return 0
    status = os.waitpid(exit_of, 0)[1]
    return os.waitstatus_to_exitcode(status) & 0xFF


def tail_lines(data, tail):
    if tail in (None, "all") or int(tail) < 0:
        return data
    if int(tail) == 0:
        return b""
    return b"".join(data.splitlines(keepends=True)[-int(tail):])


def cmd_logs(store, args):
    opts, pos = parse(args, LOGS_SPEC)
    if len(pos) != 1:
        raise DockerError('"docker logs" requires exactly 1 argument.', 1)
    container = must_find(store, pos[0])
    try:
        log = open(store.log_path(container), "rb")
    except FileNotFoundError:
        raise daemon_error(f"No such container: {pos[0]}")
    with log:
        sys.stdout.buffer.write(tail_lines(log.read(), opts["tail"]))
        sys.stdout.flush()
        if opts["follow"]:
            cdir = store.cdir(container)
            follow(log, lambda: store.state(container)["Running"],
                   lambda: not exists(cdir))
    return 0


# -- rm / stop / kill ------------------------------------------------------------
# https://docs.docker.com/reference/cli/docker/container/rm/: "--force: Force the removal of a
# running container (uses SIGKILL)". https://docs.docker.com/reference/cli/docker/container/stop/:
# "The main process inside the container will receive SIGTERM, and after a grace period, SIGKILL"
# (-t/--timeout, default 10 s); the CLI stops the containers it is given in parallel.
DEFAULT_STOP_TIMEOUT = 10


def kill_container(store, container):
    """SIGKILL every process of the container; wait until they are gone. Its supervisor goes
    last: as containerd's shim does, it reaps the main process and records its exit (137)."""
    pids = store.container_pids(container)
    procs.signal_all([pid for pid in pids if pid != container.get("Pgid")], signal.SIGKILL)
    procs.signal_all(procs.wait_gone(pids, 2.0), signal.SIGKILL)
    left = procs.wait_gone(pids, 2.0)
    if left:
        raise daemon_error(f"could not kill container {container['Name']}: {left}")


def stop_containers(store, containers, grace, sig=signal.SIGTERM):
    """The stop signal to each running container's main process at once; SIGKILL to what is
    left of those still running after grace seconds. When the main process exits, the rest of
    the container is killed with it (the supervisor, as the end of PID 1 does)."""
    running = [c for c in containers if store.state(c)["Running"]]
    procs.signal_all([c["Pid"] for c in running if c.get("Pid")], sig)
    deadline = time.monotonic() + grace
    while any(store.state(c)["Running"] for c in running) and time.monotonic() < deadline:
        time.sleep(0.02)
    for container in running:
        kill_container(store, container)


def signal_number(text):
    """A signal given as docker takes it: a name (KILL, SIGKILL) or a number."""
    name = text.upper().removeprefix("SIG")
    sig = int(name) if name.isdigit() else getattr(signal, "SIG" + name, None)
    if sig is None:
        raise DockerError(f"invalid signal: {text}")
    return sig


def cmd_rm(store, args):
    opts, pos = parse(args, RM_SPEC)
    if not pos:
        raise DockerError('"docker rm" requires at least 1 argument.', 1)
    errors = []
    for ref in pos:
        container = store.find_container(ref)
        if not container:
            if not opts["force"]:
                errors.append(f"Error response from daemon: No such container: {ref}")
            continue
        if store.state(container)["Running"] and not opts["force"]:
            errors.append(f'Error response from daemon: cannot remove container '
                          f'"/{container["Name"]}": container is running: stop the container '
                          "before removing or force remove")
            continue
        kill_container(store, container)
        store.delete_container(container)
        print(ref)
    if errors:
        raise DockerError("\n".join(errors))
    return 0


def cmd_stop(store, args):
    opts, pos = parse(args, STOP_SPEC)
    if not pos:
        raise DockerError('"docker stop" requires at least 1 argument.', 1)
    containers = [must_find(store, ref) for ref in pos]
    stop_containers(store, containers, float(opts["timeout"] or DEFAULT_STOP_TIMEOUT),
                    signal_number(opts["signal"] or "TERM"))
    for ref in pos:
        print(ref)
    return 0


def cmd_kill(store, args):
    opts, pos = parse(args, KILL_SPEC)
    if not pos:
        raise DockerError('"docker kill" requires at least 1 argument.', 1)
    sig = signal_number(opts["signal"] or "KILL")
    for ref in pos:
        container = must_find(store, ref)
        if not store.state(container)["Running"]:
            raise daemon_error(f"cannot kill container: {ref}: "
                               f"container {container['Id']} is not running")
        procs.signal_all(store.container_pids(container), sig)
        if sig == signal.SIGKILL:
            procs.wait_gone(store.container_pids(container), 2.0)
        print(ref)
    return 0


# -- exec ----------------------------------------------------------------------
def running_env(container):
    """The real environment of the container (read from its main process)."""
    try:
        with open(f"/proc/{container['Pid']}/environ", "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return None
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def cmd_exec(store, args):
    opts, pos = parse(args, EXEC_SPEC, interspersed=False)
    if len(pos) < 2:
        raise DockerError('"docker exec" requires at least 2 arguments.', 1)
    container = must_find(store, pos[0])
    env = store.state(container)["Running"] and running_env(container)
    if not env:
        raise daemon_error(f"container {container['Id']} is not running")
    env.update(user_env(opts["env"], opts["env_file"]))
    cwd = opts["workdir"] if opts["workdir"] and os.path.isdir(opts["workdir"]) else "/"
    import subprocess

    try:
        child = subprocess.Popen(
            pos[1:], env=env, cwd=cwd, start_new_session=True,
            stdin=None if opts["interactive"] else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if opts["detach"] else None,
            stderr=subprocess.DEVNULL if opts["detach"] else None)
    except FileNotFoundError:
        raise DockerError("OCI runtime exec failed: exec failed: unable to start container "
                          f'process: exec: "{pos[1]}": executable file not found in $PATH: '
                          "unknown", 127)
    if opts["detach"]:
        return 0
    code = child.wait()
    return 128 - code if code < 0 else code
