"""Environment of a simulated host seen from inside a fake container."""
import atexit
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

STATE = Path(os.environ.get("TESTBED_STATE", "/nonexistent"))
LOCAL_NAMES = ("", "0.0.0.0", "::", "localhost", "127.0.0.1")


def log(message):
    print(message, flush=True)


def die(message, code=1):
    log(message)
    sys.exit(code)


def host_addr():
    return os.environ.get("TESTBED_HOST_ADDR", "127.0.0.1")


def fault(name):
    """Content of $TESTBED_STATE/faults/<name>, or None when not set."""
    try:
        return (STATE / "faults" / name).read_text().strip()
    except OSError:
        return None


def real_addr(addr):
    """Loopback address standing in for addr (fake IB IPs, wildcards, localhost)."""
    if addr in LOCAL_NAMES:
        return host_addr()
    return _addrmap().get(addr, addr)


def _addrmap():
    try:
        return json.loads((STATE / "addrmap.json").read_text())
    except (OSError, ValueError):
        return {}


def bind_addresses(addr):
    """Where a listener asked for addr binds: its loopback stand-in and, when that is this
    host, also the host's loopback InfiniBand aliases (as a real wildcard bind would)."""
    target = real_addr(addr)
    if target != host_addr():
        return [target]
    aliases = sorted(ip for ip, owner in _addrmap().items()
                     if owner == target and ip != target and ip.startswith("127."))
    return [target] + aliases


def host_path(path):
    """Translate a container path through the container's -v mounts."""
    mounts = json.loads(os.environ.get("TESTBED_MOUNTS") or "{}")
    for dst in sorted(mounts, key=len, reverse=True):
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            return mounts[dst] + path[len(dst.rstrip("/")):]
    return path


def start_faults(error_line):
    """Apply engine faults: engine_exit (prints error_line, exits 1),
    engine_slow_ready, engine_crash_after, engine_crash (exits 1 as soon as it is set)."""
    if fault("engine_exit") is not None:
        die(error_line)
    slow = fault("engine_slow_ready")
    if slow is not None:
        time.sleep(float(slow or 5))
    crash = fault("engine_crash_after")
    if crash is not None:
        def crash_later():
            time.sleep(float(crash or 5))
            log("ERROR: engine core died unexpectedly (engine_crash_after fault)")
            os._exit(1)
        threading.Thread(target=crash_later, daemon=True).start()
    threading.Thread(target=crash_when_told, daemon=True).start()


def crash_when_told():
    """The engine core dying under a running server (faults/engine_crash), checked 5 times a second."""
    while fault("engine_crash") is None:
        time.sleep(0.2)
    log("ERROR: engine core died unexpectedly (engine_crash fault)")
    os._exit(1)


def loose_args(argv, values=(), bools=()):
    """Parse engine flags leniently: unknown flags are accepted and ignored.

    An unknown flag takes the next token as its value unless it looks like a
    flag. Returns (dict of flag -> value with '-' in names, positionals).
    """
    opts, pos, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            pos.append(arg)
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if eq:
            opts[name] = value
        elif name in bools:
            opts[name] = True
        elif i < len(argv) and (name in values or not argv[i].startswith("-")):
            opts[name], i = argv[i], i + 1
        else:
            opts[name] = True
    return opts, pos


def check_model_path(model):
    """Engines fail like the real ones when a local model path is missing."""
    if model.startswith("/") and not os.path.exists(host_path(model)):
        die(f"ERROR: model path does not exist: {model}")


def default_route_ip():
    """The address the default route leaves from (the management network), or None in an
    offline lab (fault no_default_route)."""
    return None if fault("no_default_route") is not None else host_addr()


def advertised_ip(*names):
    """The address an engine tells its peers, as vLLM's and SGLang's get_ip() pick it: the first
    of the named variables that is set, else the default route's address, else 0.0.0.0
    (vllm/utils/network_utils.py get_ip; sglang/srt/utils get_ip)."""
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default_route_ip() or "0.0.0.0"


def local_devices():
    """What NCCL can use on this host: interfaces that are up with an IPv4 address, and RDMA
    devices whose port is ACTIVE (from the host's facts and sysfs)."""
    try:
        nics = json.loads((STATE / "facts" / "net.json").read_text())
    except (OSError, ValueError):
        nics = []
    ib = STATE / "sysfs" / "class" / "infiniband"
    hcas = sorted(os.listdir(ib)) if ib.is_dir() else []
    return {"net": [n["ifname"] for n in nics if n.get("ipv4") and n.get("state") in ("UP", "UNKNOWN")],
            "ib": [h for h in hcas if "ACTIVE" in (ib / h / "ports" / "1" / "state").read_text()]}


def host_facts(name):
    """facts/<name>.json of this host ({} when missing)."""
    try:
        return json.loads((STATE / "facts" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def gpu_total_mib():
    """The GPU's memory as an engine sees it: facts/gpu.json's memory_mib, or on unified memory
    (a GB10) the host's MemTotal from facts/memory.json."""
    gpu = host_facts("gpu")
    if gpu.get("unified_memory"):
        return host_facts("memory").get("total_kib", 0) // 1024
    return gpu.get("memory_mib", 0)


def gpu_free_mib():
    """Free GPU memory of this host (facts/gpu.json: free_mib, else all of memory_mib; on unified
    memory the host's available memory from facts/memory.json)."""
    gpu = host_facts("gpu")
    if "free_mib" in gpu:
        return gpu["free_mib"]
    if gpu.get("unified_memory"):
        return host_facts("memory").get("available_kib", 0) // 1024
    return gpu.get("memory_mib", 0)


SHM_SEGMENT_MIB = 128


def shared_memory_segment():
    """The POSIX shared memory vLLM and SGLang create at start (vLLM's shm_broadcast ring buffer
    psm_*, multiprocessing's sem.mp-*; vLLM's KV offload vllm_offload_*.mmap): under `docker run
    --ipc host` a file in the host's /dev/shm (TESTBED_DEV_SHM), of faults/engine_shm_mib MiB. The
    engine unlinks it when it shuts down on SIGTERM, and Python's exit unlinks it after an error
    (multiprocessing's resource_tracker cleans up "leaked shared_memory objects"); SIGKILL, or a
    crash that ends the process at once, leaves it there until reboot
    (vllm-project/vllm#51317 and #51579; MiaAI-Lab/Qwen3.8-Flash-Next-Single-DGX-Spark#13).
    faults/engine_slow_stop: the shutdown takes that many seconds first. The file holds its size
    in KiB, which the host's meminfo counts as Shmem (hostbin/memo)."""
    folder = os.environ.get("TESTBED_DEV_SHM")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    segment = Path(folder) / f"psm_{os.getpid():08x}"
    segment.write_text(f"{int(float(fault('engine_shm_mib') or SHM_SEGMENT_MIB) * 1024)}\n")
    atexit.register(segment.unlink, missing_ok=True)

    def shut_down(_signum, _frame):
        log("INFO:     Shutting down")
        time.sleep(float(fault("engine_slow_stop") or 0))
        segment.unlink(missing_ok=True)
        log("INFO:     Finished server process")
        os._exit(0)

    signal.signal(signal.SIGTERM, shut_down)
