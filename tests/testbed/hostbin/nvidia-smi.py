#!/usr/bin/python3 -S
"""Fake `nvidia-smi` answering from $TESTBED_STATE/facts/gpu.json.

Supports: -L, --query-gpu=F1,F2 and --query-compute-apps=F1,F2 with
--format=csv[,noheader][,nounits], plain.

Like a DGX Spark (unified_memory in the facts), the GB10 has no memory of its own to report:
memory.total/used/free are "[N/A]" while each process's used_memory is reported (NVIDIA
developer forums, "DGX Spark: nvidia-smi memory usage Not Supported"). The processes are the
live ones registered in $TESTBED_STATE/gpu_processes/<pid> ("MiB name") by the stand-in engines
(seen on DGX Spark with driver 580: github.com/XuehaiPan/nvitop/pull/208,
github.com/mostlygeek/llama-swap/issues/782). The memo in front of this script also rewrites the
host's meminfo whenever the processes are asked for (see memo).
"""
import json
import os
import sys

NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")
UNITS = {"memory.total": "MiB", "memory.used": "MiB", "memory.free": "MiB",
         "power.draw": "W", "temperature.gpu": "", "utilization.gpu": "%", "used_memory": "MiB"}
NOT_AVAILABLE = "[N/A]"
UNIFIED = ("memory.total", "memory.used", "memory.free")


def gpu_facts():
    path = os.path.join(os.environ.get("TESTBED_STATE", "/nonexistent"), "facts", "gpu.json")
    with open(path) as f:
        return json.load(f)


def field(gpu, index, name):
    values = {
        "name": gpu["name"], "index": str(index), "count": str(gpu["count"]),
        "uuid": f"GPU-{gpu['uuid']}-{index:04d}", "driver_version": gpu["driver"],
        "memory.total": str(gpu["memory_mib"]), "memory.used": "0",
        "memory.free": str(gpu["memory_mib"]), "compute_cap": "12.1",
        "pci.bus_id": f"0000000F:01:00.{index}", "temperature.gpu": "38",
        "utilization.gpu": "0", "power.draw": "4.50",
    }
    if gpu.get("unified_memory") and name in UNIFIED:
        return NOT_AVAILABLE
    return values.get(name)


def with_unit(name, value, nounits):
    return value if nounits or not UNITS.get(name) or value == NOT_AVAILABLE else f"{value} {UNITS[name]}"


def gpu_processes():
    """(pid, name, MiB) of the live registered GPU memory holders."""
    folder = os.path.join(os.environ.get("TESTBED_STATE", "/nonexistent"), "gpu_processes")
    found = []
    for pid in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if os.path.exists(f"/proc/{pid}"):
            with open(os.path.join(folder, pid)) as f:
                mib, _, name = f.read().strip().partition(" ")
            found.append((pid, name, mib))
    return found


def query_apps(gpu, fields, fmt):
    nounits = "nounits" in fmt.split(",")
    if "noheader" not in fmt.split(","):
        print(", ".join(n if nounits or not UNITS.get(n) else f"{n} [{UNITS[n]}]" for n in fields))
    for pid, name, mib in gpu_processes():
        values = {"pid": pid, "process_name": name, "name": name, "used_memory": mib,
                  "gpu_uuid": f"GPU-{gpu['uuid']}-0000", "gpu_bus_id": "0000000F:01:00.0"}
        if any(n not in values for n in fields):
            bad = next(n for n in fields if n not in values)
            print(f'Field "{bad}" is not a valid field to query.', file=sys.stderr)
            return 2
        print(", ".join(with_unit(n, values[n], nounits) for n in fields))
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
        return query_apps(gpu, opts["--query-compute-apps"].split(","), opts.get("--format", "csv"))
    print(f"| NVIDIA-SMI {gpu['driver']}    Driver Version: {gpu['driver']}    "
          f"CUDA Version: {gpu['cuda']} |")
    usage = "Not Supported" if gpu.get("unified_memory") else f"0MiB / {gpu['memory_mib']}MiB"
    for index in range(gpu["count"]):
        print(f"|   {index}  {gpu['name']}   On | 0000000F:01:00.{index} Off | {usage} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
