"""On-disk state of the docker stand-in: images, containers, call log.

Layout under <state>/docker/: calls.jsonl, images/<hex>.json + .payload,
registry/ (same layout; what `pull` can fetch), containers/<id>/
(config.json, exit.json, log), volumes/<name>/.
"""
# What only some commands need is imported inside them: `ps` runs on every sparkrun status.
import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path

from . import procs

SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSW|API_KEY|PRIVATE|CREDENTIAL|_KEY$",
                        re.IGNORECASE)


def normalize_ref(ref):
    """'docker.io/library/x' -> 'x:latest' (digests are left alone)."""
    if "@" in ref:
        return ref
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
    if ":" not in ref.rsplit("/", 1)[-1]:
        ref += ":latest"
    return ref


def mask_env(key, value):
    """Value as recorded: secrets are never written to disk."""
    return "***" if SECRET_KEY.search(key) else value


def write_json(path, data):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def payload_chunks(name, size):
    """Deterministic payload bytes for an image made by the bed."""
    import hashlib

    block = hashlib.sha256(name.encode()).digest() * 32768  # 1 MiB
    while size > 0:
        yield block[:size]
        size -= len(block)


def random_name():
    import random

    left = ["eager", "brave", "calm", "jolly", "quirky", "sharp", "vivid"]
    right = ["turing", "hopper", "curie", "noether", "lovelace", "knuth"]
    return f"{random.choice(left)}_{random.choice(right)}{random.randint(1, 99)}"


class Store:
    """Docker state of one simulated host (root = its TESTBED_STATE)."""

    def __init__(self, root):
        self.root = Path(root)
        self.dir = self.root / "docker"
        for sub in ("images", "registry", "containers", "volumes"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self):
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def fault(self, name):
        """Content of faults/<name> (a set fault), or None."""
        try:
            return (self.root / "faults" / name).read_text().strip()
        except OSError:
            return None

    # -- call log ---------------------------------------------------------
    def record_call(self, argv):
        line = json.dumps({"ts": time.time(), "argv": argv}) + "\n"
        with open(self.dir / "calls.jsonl", "a") as f:
            f.write(line)

    def calls(self):
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def clear_calls(self):
        (self.dir / "calls.jsonl").unlink(missing_ok=True)

    # -- images -----------------------------------------------------------
    def images(self, registry=False):
        folder = self.dir / ("registry" if registry else "images")
        found = [read_json(p) for p in sorted(folder.glob("*.json"))]
        return sorted((i for i in found if i), key=lambda i: -i["Created"])

    def find_image(self, ref, registry=False):
        images = self.images(registry)
        tag = normalize_ref(ref)
        for image in images:
            if tag in image["RepoTags"]:
                return image
        hexid = ref.removeprefix("sha256:").lower()
        if re.fullmatch(r"[0-9a-f]{4,64}", hexid):
            hits = [i for i in images if i["Id"][7:].startswith(hexid)]
            if len(hits) == 1:
                return hits[0]
        return None

    def payload_path(self, image, registry=False):
        folder = self.dir / ("registry" if registry else "images")
        return folder / (image["Id"][7:] + ".payload")

    def install_image(self, meta, chunks, registry=False):
        """Store an image; its id is sha256 of the payload unless meta has one."""
        folder = self.dir / ("registry" if registry else "images")
        tmp = folder / f".payload.{os.getpid()}.tmp"
        import hashlib

        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        meta = dict(meta, Size=size)
        meta.setdefault("Id", "sha256:" + digest.hexdigest())
        meta.setdefault("Created", time.time())
        with self.lock():
            for tag in meta["RepoTags"]:
                self.untag(tag, registry)
            old = read_json(folder / (meta["Id"][7:] + ".json"))
            if old:
                meta["RepoTags"] = sorted(set(old["RepoTags"]) | set(meta["RepoTags"]))
            os.replace(tmp, folder / (meta["Id"][7:] + ".payload"))
            write_json(folder / (meta["Id"][7:] + ".json"), meta)
        return meta

    def tag_image(self, image, tag, registry=False):
        tag = normalize_ref(tag)
        folder = self.dir / ("registry" if registry else "images")
        with self.lock():
            self.untag(tag, registry)
            image = read_json(folder / (image["Id"][7:] + ".json"))
            image["RepoTags"] = sorted(set(image["RepoTags"]) | {tag})
            write_json(folder / (image["Id"][7:] + ".json"), image)

    def untag(self, tag, registry=False):
        """Drop a tag from whichever image has it (caller holds the lock)."""
        for image in self.images(registry):
            if tag in image["RepoTags"]:
                image["RepoTags"].remove(tag)
                folder = self.dir / ("registry" if registry else "images")
                write_json(folder / (image["Id"][7:] + ".json"), image)

    def remove_image(self, image):
        for suffix in (".json", ".payload"):
            (self.dir / "images" / (image["Id"][7:] + suffix)).unlink(missing_ok=True)

    # -- containers -------------------------------------------------------
    def cdir(self, container):
        return self.dir / "containers" / container["Id"]

    def containers(self):
        found = [read_json(p / "config.json")
                 for p in (self.dir / "containers").iterdir()]
        return sorted((c for c in found if c), key=lambda c: -c["Created"])

    def find_container(self, ref):
        ref = ref.lstrip("/")
        containers = self.containers()
        for c in containers:
            if ref in (c["Name"], c["Id"]):
                return c
        hits = [c for c in containers if ref and c["Id"].startswith(ref)]
        return hits[0] if len(hits) == 1 else None

    def save_container(self, container):
        self.cdir(container).mkdir(exist_ok=True)
        write_json(self.cdir(container) / "config.json", container)

    def delete_container(self, container):
        folder = self.cdir(container)
        for path in folder.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()

    def log_path(self, container):
        return self.cdir(container) / "log"

    def state(self, container):
        """Docker-like State dict, derived from the processes and exit.json."""
        done = read_json(self.cdir(container) / "exit.json")
        pgid = container.get("Pgid")
        running = not done and pgid and procs.alive(pgid, container["PgidStart"])
        if done:
            status, code, finished = "exited", done["ExitCode"], done["Finished"]
        elif running:
            status, code, finished = "running", 0, None
        elif pgid:
            status, code, finished = "exited", 137, None
        else:
            status, code, finished = "created", 0, None
        return {"Status": status, "Running": bool(running), "Paused": False,
                "Restarting": False, "OOMKilled": False, "Dead": False,
                "Pid": container.get("Pid", 0) if running else 0,
                "ExitCode": code, "Error": (done or {}).get("Error", ""),
                "StartedAt": container.get("Started"), "FinishedAt": finished}

    def container_pids(self, container):
        """Live processes of a container: its process group plus anything
        carrying its TESTBED_CONTAINER marker (exec'd or re-parented)."""
        pids = set(procs.marked(f"TESTBED_CONTAINER={container['Id']}".encode()))
        if container.get("Pgid"):
            pids.update(procs.group_members(container["Pgid"]))
        return sorted(pids)

    def new_container_id(self):
        return os.urandom(32).hex()
