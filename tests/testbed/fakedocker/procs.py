"""Process helpers built on /proc (shared by the stand-in and the bed)."""
import os
import signal
import time


def _stat(pid):
    """Return the fields of /proc/<pid>/stat after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()


def start_time(pid):
    """Kernel start time of a process (clock ticks), or None if gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid, started=None):
    """True if pid runs (not a zombie) and, if given, started at `started`."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def read_proc(pid, name):
    """Text of /proc/<pid>/<name> (NULs as spaces), or '' if gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def group_members(pgid):
    """Live processes whose process group is pgid."""
    out = []
    for pid in all_pids():
        fields = _stat(pid)
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(pid)
    return out


def descendants(root):
    """Live descendants of root (not including root)."""
    children = {}
    for pid in all_pids():
        fields = _stat(pid)
        if fields and fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def marked(*markers, prefix=None):
    """Live processes whose initial environment holds every marker (bytes
    'KEY=value') and, if given, some entry starting with prefix."""
    out = []
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if all(m in env for m in markers) and alive(pid) and (
                prefix is None or any(e.startswith(prefix) for e in env)):
            out.append(pid)
    return out


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def wait_gone(pids, timeout):
    """Wait until none of pids is alive; return the ones still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def terminate(pids, grace=1.0):
    """SIGTERM, wait up to grace seconds, then SIGKILL whatever is left."""
    signal_all(pids, signal.SIGTERM)
    left = wait_gone(pids, grace)
    signal_all(left, signal.SIGKILL)
    return wait_gone(left, 2.0)
