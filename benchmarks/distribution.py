#!/usr/bin/env python3
"""Model and image distribution: a generated model (256 MiB by default) and a 64 MiB image from this
machine to 1, 2 and 3 simulated hosts after `setup ssh`, then a second run. Prints the bytes this
machine sent (against the model and image size), the bytes between hosts and over which addresses
(the bed's byte meter), the time of the launch's distribution step against plain copies from this
machine (rsync of the model, docker save | load) to the same hosts, and what the second run moved.
Every "host" shares this machine's CPU and disk, so times show overheads, not a fabric's speed.

Usage: python3 benchmarks/distribution.py [--mib 256]   (SPARKRUN_TEST_BED_OCTET moves the hosts)
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import time

from common import bed, sparkrun

IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
IMAGE_SIZE = 64 << 20
MODEL = "bench/generated-model"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_model(hf_home, size: int) -> None:
    """An HF cache entry: blobs, snapshot symlinks, refs/main, 4 shards of incompressible data."""
    repo = hf_home / "hub" / f"models--{MODEL.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    files = {"config.json": json.dumps({"num_hidden_layers": 2}).encode()}
    for index in range(4):
        files[f"model-0000{index + 1}-of-00004.safetensors"] = None
    for number, (name, content) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{number:02d}"
        blob.parent.mkdir(exist_ok=True)
        with open(blob, "wb") as handle:
            if content is not None:
                handle.write(content)
            else:
                for _ in range(size // 4 // (1 << 20)):
                    handle.write(os.urandom(1 << 20))
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def fresh_hosts(testbed, env, hosts: str) -> None:
    """Hosts without the model or the image, logging in to each other (`setup ssh`)."""
    testbed.reset(images=True)
    sparkrun(env, "setup", "ssh", "-H", hosts, "--no-include-self")
    testbed.meter.reset()


def launch(testbed, env, recipe, hosts: str, count: int) -> tuple[float, list]:
    """(seconds of the launch's distribution step, the bytes each ssh connection carried)."""
    _, result = sparkrun(env, "run", recipe, "-H", hosts, "--tp", count, "--no-follow", "-v")
    moved = testbed.transfers()
    sparkrun(env, "stop", recipe, "-H", hosts)
    return float(re.search(r"of which ([\d.]+) s image and model distribution", result.stderr)[1]), moved


def report(moved: list, payload: int) -> None:
    from_here = sum(t["sent"] for t in moved if t["from"] == "control")
    print(f"  this machine sent {mib(from_here)} ({from_here / payload:.3f} x model + image)")
    for t in sorted((t for t in moved if t["from"] != "control"), key=lambda t: (t["from"], t["to"])):
        print(f"  host to host: {t['from']} -> {t['to']}: {mib(t['sent'])}")


def plain_copy(testbed, env, home, hosts: list) -> float:
    """The same copies without sparkrun, from this machine to every host in parallel: rsync of
    the model folder, and `docker save | ssh host docker load`."""
    ssh = f"ssh -F {testbed.ssh_config}"
    start = time.perf_counter()
    jobs = [subprocess.Popen(["bash", "-c", f"rsync -a -e {shlex.quote(ssh)} {shlex.quote(str(home / 'hf' / 'hub'))}/ "
                                            f"{host}:plain-copy/ && docker save {IMAGE} | {ssh} {host} docker load"],
                             env=env, stdout=subprocess.DEVNULL) for host in hosts]
    if any(job.wait() != 0 for job in jobs):
        raise SystemExit("plain copy failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    size = args.mib << 20
    octet = int(os.environ.get("SPARKRUN_TEST_BED_OCTET", "91"))
    with bed(3, first_octet=octet) as (testbed, env, home):
        make_model(home / "hf", size)
        recipe = home / "bench.yaml"
        recipe.write_text(f"model: {MODEL}\nruntime: vllm\ncontainer: {IMAGE}\ndefaults: {{served_model_name: m}}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --host {host} --port {port}\n")
        payload = size + IMAGE_SIZE
        install_control_image(env)
        print(f"model {mib(size)}, image {mib(IMAGE_SIZE)}")
        for count in (1, 2, 3):
            addresses = [h.addr for h in testbed.hosts[:count]]
            hosts = ",".join(addresses)
            fresh_hosts(testbed, env, hosts)
            seconds, moved = launch(testbed, env, recipe, hosts, count)
            print(f"{count} host(s): distribution step {seconds:.1f} s")
            report(moved, payload)
            plain = plain_copy(testbed, env, home, addresses)
            print(f"  plain rsync and docker save | load from this machine to each host in parallel: {plain:.1f} s")
            testbed.meter.reset()
            seconds, moved = launch(testbed, env, recipe, hosts, count)
            between = sum(t["sent"] for t in moved if t["from"] != "control")
            from_here = sum(t["sent"] for t in moved if t["from"] == "control")
            print(f"  second run: distribution step {seconds:.2f} s; {between} bytes between hosts; this machine sent "
                  f"{from_here / 1024:.0f} KiB (its commands: no model or image data)")


def install_control_image(env) -> None:
    """The image in this machine's docker (the stand-in's state of the control machine)."""
    from testbed.host import install_image
    from testbed.fakedocker.store import Store

    install_image(Store(env["TESTBED_STATE"]), IMAGE, IMAGE_SIZE)


if __name__ == "__main__":
    main()
