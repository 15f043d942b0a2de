"""Starting container processes under a small supervisor.

The supervisor is forked from the docker command, starts a new session
(so its pid is the container's process group id), runs the command with
output to the container log, records the exit code in exit.json when the
command ends, kills what is left of the container and exits with the
command's code.
"""
import json
import os
import signal
import subprocess
import time

from . import procs
from .common import DockerError
from .store import write_json


def start(store, container, argv, env, cwd):
    """Fork the supervisor; return its pid once the command has started."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1
        try:
            code = _supervise(store, container, argv, env, cwd, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        reply = json.loads(f.read() or '{"error": "supervisor died", "code": 125}')
    if "error" in reply:
        raise DockerError(reply["error"], reply["code"])
    return pid


def _detach_stdio(log_path, keep):
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, keep)
    os.closerange(keep + 1, 4096)


def _supervise(store, container, argv, env, cwd, reply_fd):
    os.setsid()
    _detach_stdio(store.log_path(container), reply_fd)
    try:
        child = subprocess.Popen(argv, env=env, cwd=cwd)
    except OSError as exc:
        reason = "executable file not found in $PATH" if isinstance(exc, FileNotFoundError) else exc
        message = (f"Error response from daemon: failed to create task for container: "
                   f"exec: \"{argv[0]}\": {reason}: unknown")
        _finish(store, container, 127, message)
        os.write(reply_fd, json.dumps({"error": message, "code": 127}).encode())
        return 127
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    me = os.getpid()
    container.update(Pid=child.pid, Pgid=me, PgidStart=procs.start_time(me), Started=time.time())
    store.save_container(container)
    os.write(reply_fd, json.dumps({"pid": child.pid}).encode())
    os.close(reply_fd)
    code = child.wait()
    code = 128 - code if code < 0 else code
    _finish(store, container, code)
    return code


def _finish(store, container, code, error=""):
    """Record the exit, kill leftovers, remove the container if --rm."""
    write_json(os.path.join(store.cdir(container), "exit.json"),
               {"ExitCode": code, "Finished": time.time(), "Error": error})
    leftovers = [p for p in store.container_pids(container) if p != os.getpid()]
    procs.signal_all(leftovers, signal.SIGKILL)
    if container.get("AutoRemove"):
        store.delete_container(container)
