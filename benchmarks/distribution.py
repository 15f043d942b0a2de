#!/usr/bin/env python3
"""Model distribution: a generated model (1 GiB by default) from this machine's Hugging Face
cache to 3 simulated hosts over ssh on loopback, against a plain rsync of the same folder to
one host; then a second run, which should move nothing.

Usage: python3 benchmarks/distribution.py [--gib 1.0]
"""

import argparse
import json
import os
import re
import subprocess
import time

from common import bed, sparkrun

IMAGE = "scitrera/dgx-spark-vllm:0.16.0-t5"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    with bed(4, first_octet=91) as (testbed, env, home):
        testbed.add_image(IMAGE)
        make_model(home / "hf", size)
        recipe = home / "bench.yaml"
        recipe.write_text(f"model: {MODEL}\nruntime: vllm\ncontainer: {IMAGE}\ndefaults: {{served_model_name: m}}\n"
                          "command: vllm serve {model} --served-model-name {served_model_name} --host {host} --port {port}\n")
        hosts = ",".join(h.addr for h in testbed.hosts[:3])
        wall, result = sparkrun(env, "run", recipe, "-H", hosts, "--tp", 3, "--no-follow")
        synced = [l for l in result.stderr.splitlines() if "model synced" in l]
        sparkrun(env, "stop", recipe, "-H", hosts)
        print(f"first run, {args.gib:g} GiB model to 3 hosts: {wall:.1f} s wall "
              f"({3 * size / (1 << 20) / wall:.0f} MiB/s aggregate)")
        for line in synced:
            print(f"  {line}")

        plain_target = testbed.hosts[3]
        start = time.perf_counter()
        subprocess.run(["rsync", "-a", "-e", f"ssh -F {testbed.ssh_config}",
                        str(home / "hf" / "hub") + "/", f"{plain_target.addr}:plain-copy/"], check=True, env=env)
        plain = time.perf_counter() - start
        print(f"plain rsync of the same folder to 1 host: {plain:.1f} s ({size / (1 << 20) / plain:.0f} MiB/s)")

        wall, result = sparkrun(env, "run", recipe, "-H", hosts, "--tp", 3, "--no-follow", "-v")
        moved = sum(int(n.replace(",", "")) for n in re.findall(r"model synced: ([\d,.]+) MiB", result.stderr))
        skipped = "already on every host" in result.stderr
        waited = float(re.search(r"([\d.]+) s waiting for the server", result.stderr)[1])
        distribution = float(re.search(r"of which ([\d.]+) s image and model distribution", result.stderr)[1])
        sparkrun(env, "stop", recipe, "-H", hosts)
        print(f"second run: {moved} bytes of model moved (skipped: {skipped}); distribution step {distribution:.2f} s; "
              f"{wall:.2f} s wall for the whole launch, of which {wall - waited:.2f} s sparkrun's own")


if __name__ == "__main__":
    main()
