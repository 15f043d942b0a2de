"""Entry point of the docker stand-in: call logging, faults, dispatch."""
import importlib
import os
import sys
import time

from .args import ArgError, parse, spec
from .common import DockerError, print_formatted
from .store import Store

VERSION = "27.3.1"
PERMISSION = ("permission denied while trying to connect to the Docker daemon socket at "
              "unix:///var/run/docker.sock: Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.47/info\": "
              "dial unix /var/run/docker.sock: connect: permission denied")
FORMAT_SPEC = spec(values="f,format")


def info_obj(store):
    states = [store.state(c)["Status"] for c in store.containers()]
    return {
        "ID": os.environ.get("TESTBED_HOST_ID", ""), "Name": os.environ.get("TESTBED_HOST_ID", ""),
        "Containers": len(states), "ContainersRunning": states.count("running"),
        "ContainersPaused": 0, "ContainersStopped": len(states) - states.count("running"),
        "Images": len(store.images()), "Driver": "overlay2", "ServerVersion": VERSION,
        "OperatingSystem": "Ubuntu 24.04.3 LTS", "OSType": "linux", "Architecture": "aarch64",
        "NCPU": 20, "MemTotal": 128_526_278_656, "DockerRootDir": "/var/lib/docker",
        "Runtimes": {"nvidia": {"path": "nvidia-container-runtime"}, "runc": {"path": "runc"}},
        "DefaultRuntime": "runc",
    }


def cmd_info(store, args):
    opts, _pos = parse(args, FORMAT_SPEC)
    info = info_obj(store)
    if opts["format"]:
        print_formatted([info], opts["format"], {})
        return 0
    print(f"Client:\n Version:    {VERSION}\n Context:    default\n\nServer:")
    for key in ("Containers", "ContainersRunning", "ContainersPaused", "ContainersStopped"):
        indent = " " if key == "Containers" else "  "
        print(f"{indent}{key.removeprefix('Containers') or 'Containers'}: {info[key]}")
    print(f" Images: {info['Images']}\n Server Version: {VERSION}\n Storage Driver: overlay2")
    print(" Runtimes: io.containerd.runc.v2 nvidia runc\n Default Runtime: runc")
    print(f" Operating System: {info['OperatingSystem']}\n Architecture: aarch64")
    print(f" Name: {info['Name']}\n Docker Root Dir: /var/lib/docker")
    return 0


def cmd_version(store, args):
    opts, _pos = parse(args, FORMAT_SPEC)
    part = {"Version": VERSION, "ApiVersion": "1.47", "Os": "linux", "Arch": store.daemon_arch()}
    version = {"Client": part, "Server": part}
    if opts["format"]:
        print_formatted([version], opts["format"], {})
        return 0
    for side in ("Client", "Server"):
        print(f"{side}:\n Version:           {VERSION}\n API version:       1.47\n"
              f" OS/Arch:           linux/{part['Arch']}")
    return 0


# Handlers by "module.function", imported on dispatch: `ps` (sparkrun's probe, every status)
# stays quick by never importing what `run`, `save` and `load` need.
COMMANDS = {
    "run": "containers.cmd_run", "ps": "containers.cmd_ps", "inspect": "containers.cmd_inspect",
    "logs": "containers.cmd_logs", "rm": "containers.cmd_rm", "stop": "containers.cmd_stop",
    "kill": "containers.cmd_kill", "exec": "containers.cmd_exec",
    "images": "images.cmd_images", "pull": "images.cmd_pull", "save": "images.cmd_save",
    "load": "images.cmd_load", "tag": "images.cmd_tag", "rmi": "images.cmd_rmi",
    "info": cmd_info, "version": cmd_version,
}
GROUPS = {
    "image": {"ls": "images", "list": "images", "inspect": None, "pull": "pull",
              "save": "save", "load": "load", "tag": "tag", "rm": "rmi"},
    "container": {"ls": "ps", "list": "ps", "run": "run", "inspect": "inspect",
                  "logs": "logs", "rm": "rm", "stop": "stop", "kill": "kill", "exec": "exec"},
}


def resolve(argv):
    """(handler, name shown in help hints, remaining args) for a command line."""
    if not argv:
        raise DockerError("Usage:  docker [OPTIONS] COMMAND", 0)
    name, rest = argv[0], argv[1:]
    if name in GROUPS and rest:
        sub = rest[0]
        if sub not in GROUPS[name]:
            raise DockerError(f"docker: unknown command: docker {name} {sub}\n\n"
                              f"Run 'docker {name} --help' for more information", 1)
        if name == "image" and sub == "inspect":
            return load("images.cmd_image_inspect"), "image inspect", rest[1:]
        return load(COMMANDS[GROUPS[name][sub]]), f"{name} {sub}", rest[1:]
    if name not in COMMANDS:
        raise DockerError(f"docker: unknown command: docker {name}\n\n"
                          "Run 'docker --help' for more information", 1)
    return load(COMMANDS[name]), name, rest


def load(target):
    """A handler: a function of this module, or "module.function" imported now."""
    if callable(target):
        return target
    module, _, function = target.partition(".")
    return getattr(importlib.import_module(f".{module}", __package__), function)


def run(argv):
    store = Store(os.environ["TESTBED_STATE"])
    if store.fault("no_docker") is not None:
        print("bash: line 1: docker: command not found", file=sys.stderr)
        return 127
    store.record_call(argv)
    if argv in (["--version"], ["-v"]):
        print(f"Docker version {VERSION}, build c8af8eb")
        return 0
    handler, name, args = resolve(argv)
    slow = (store.fault("docker_slow") or "").split()
    if slow[:1] == [name]:  # a busy daemon: `docker run` creates its container only at the end
        time.sleep(float(slow[1]))
    if store.fault("docker_permission") is not None:
        raise DockerError(PERMISSION)
    try:
        return handler(store, args)
    except ArgError as exc:
        raise DockerError(f"{exc}\nSee 'docker {name} --help'.", 125)


def main():
    try:
        code = run(sys.argv[1:])
    except DockerError as exc:
        print(exc, file=sys.stderr)
        code = exc.code
    except BrokenPipeError:
        code = 141
    sys.stdout.flush()
    return code
