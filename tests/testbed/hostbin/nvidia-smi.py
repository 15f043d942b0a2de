#!/usr/bin/python3 -S
"""Fake `nvidia-smi` answering from $TESTBED_STATE/facts/gpu.json.

Supports: -L, --query-gpu=F1,F2 --format=csv[,noheader][,nounits],
--query-compute-apps=F1,F2 --format=..., plain.

A GB10 (memory_mib None) has no memory of its own: memory.total/used/free are "[N/A]" and the
table says "Not Supported", while each process's used_memory is real (seen on DGX Spark with driver
580: github.com/XuehaiPan/nvitop/pull/208, github.com/mostlygeek/llama-swap/issues/782).
Processes holding GPU memory are $TESTBED_STATE/gpu/<pid> files ("name<TAB>MiB", written by the
fake engines); answering --query-compute-apps drops dead ones and writes $TESTBED_STATE/meminfo,
the host's /proc/meminfo (SPARKRUN_MEMINFO), from facts/memory.json: what the processes hold is
gone from MemAvailable, as on unified memory. sparkrun's probe reads meminfo after this answer.
"""
import json
import os
import sys

NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")
APP_FIELDS = ("pid", "process_name", "used_memory", "used_gpu_memory", "gpu_uuid", "gpu_name")
APP_UNITS = ("used_memory", "used_gpu_memory")
UNITS = {"memory.total": "MiB", "memory.used": "MiB", "memory.free": "MiB",
         "power.draw": "W", "temperature.gpu": "", "utilization.gpu": "%"}


STATE = os.environ.get("TESTBED_STATE", "/nonexistent")
NOT_AVAILABLE = "[N/A]"


def read_json(name):
    with open(os.path.join(STATE, "facts", name)) as f:
        return json.load(f)


def gpu_facts():
    return read_json("gpu.json")


def gpu_processes():
    """(pid, name, MiB) of live processes holding GPU memory; dead ones are forgotten."""
    folder = os.path.join(STATE, "gpu")
    found = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, entry)
        if not os.path.exists(f"/proc/{entry}"):
            os.unlink(path)
            continue
        with open(path) as f:
            name, _, mib = f.read().strip().partition("\t")
        found.append((int(entry), name, int(mib)))
    return found


def write_meminfo(held_mib):
    memory = read_json("memory.json")
    available = max(memory["available_kib"] - held_mib * 1024, 0)
    lines = [("MemTotal", memory["total_kib"]), ("MemFree", available), ("MemAvailable", available),
             ("Buffers", 0), ("Cached", 0)]
    path = os.path.join(STATE, "meminfo")
    with open(path + ".tmp", "w") as f:
        f.write("".join(f"{key + ':':<16}{value:>8} kB\n" for key, value in lines))
    os.replace(path + ".tmp", path)


def memory(gpu, used_mib):
    """memory.total/used/free: '[N/A]' on unified memory, else MiB."""
    if gpu["memory_mib"] is None:
        return NOT_AVAILABLE, NOT_AVAILABLE, NOT_AVAILABLE
    return str(gpu["memory_mib"]), str(used_mib), str(gpu["memory_mib"] - used_mib)


def field(gpu, index, name):
    total, used, free = memory(gpu, 0)
    values = {
        "name": gpu["name"], "index": str(index), "count": str(gpu["count"]),
        "uuid": f"GPU-{gpu['uuid']}-{index:04d}", "driver_version": gpu["driver"],
        "memory.total": total, "memory.used": used, "memory.free": free, "compute_cap": "12.1",
        "pci.bus_id": f"0000000F:01:00.{index}", "temperature.gpu": "38",
        "utilization.gpu": "0", "power.draw": "4.50",
    }
    return values.get(name)


def with_unit(name, value, nounits):
    return value if nounits or not UNITS.get(name) or value == NOT_AVAILABLE else f"{value} {UNITS[name]}"


def compute_apps(gpu, fields, fmt):
    """--query-compute-apps: one row per process; no rows (not even a header line's worth of
    data) when none holds memory."""
    processes = gpu_processes()
    write_meminfo(sum(mib for _, _, mib in processes))
    options = fmt.split(",")
    rows = [{"pid": str(pid), "process_name": name, "used_memory": str(mib), "used_gpu_memory": str(mib),
             "gpu_uuid": f"GPU-{gpu['uuid']}-0000", "gpu_name": gpu["name"]} for pid, name, mib in processes]
    bad = next((n for n in fields if n not in APP_FIELDS), None)
    if bad:
        print(f'Field "{bad}" is not a valid field to query.', file=sys.stderr)
        return 2
    nounits = "nounits" in options
    if "noheader" not in options:
        print(", ".join(n if nounits or n not in APP_UNITS else f"{n} [MiB]" for n in fields))
    for row in rows:
        print(", ".join(row[n] if nounits or n not in APP_UNITS else f"{row[n]} MiB" for n in fields))
    return 0


def query(gpu, fields, fmt):
    options = fmt.split(",")
    if options[0] != "csv":
        print(f'"{fmt}" is not a valid format', file=sys.stderr)
        return 2
    if any(field(gpu, 0, n) is None for n in fields):
        bad = next(n for n in fields if field(gpu, 0, n) is None)
        print(f'Field "{bad}" is not a valid field to query.', file=sys.stderr)
        return 2
    nounits = "nounits" in options
    if "noheader" not in options:
        print(", ".join(n if nounits or not UNITS.get(n) else f"{n} [{UNITS[n]}]" for n in fields))
    for index in range(gpu["count"]):
        print(", ".join(with_unit(n, field(gpu, index, n), nounits) for n in fields))
    return 0


def options(argv):
    """--opt=value or --opt value (for the options that take a value)."""
    opts, i = {}, 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if not eq and key in ("--query-gpu", "--query-compute-apps", "--format") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        opts[key] = value
        i += 1
    return opts


def main(argv):
    gpu = gpu_facts()
    if gpu["count"] < 1:
        print(NO_DRIVER)
        return 9
    opts = options(argv)
    if "-L" in opts or "--list-gpus" in opts:
        for index in range(gpu["count"]):
            print(f"GPU {index}: {gpu['name']} (UUID: GPU-{gpu['uuid']}-{index:04d})")
        return 0
    if "--query-gpu" in opts:
        return query(gpu, opts["--query-gpu"].split(","), opts.get("--format", "csv"))
    if "--query-compute-apps" in opts:
        return compute_apps(gpu, opts["--query-compute-apps"].split(","), opts.get("--format", "csv"))
    print(f"| NVIDIA-SMI {gpu['driver']}    Driver Version: {gpu['driver']}    "
          f"CUDA Version: {gpu['cuda']} |")
    usage = "Not Supported" if gpu["memory_mib"] is None else f"0MiB / {gpu['memory_mib']}MiB"
    for index in range(gpu["count"]):
        print(f"|   {index}  {gpu['name']}   On | 0000000F:01:00.{index} Off | {usage} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
