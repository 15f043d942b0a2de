"""On-disk state of the docker stand-in: images, containers, call log.

Layout under <state>/docker/: calls.jsonl, images/<hex>.json + .payload,
registry/ (same layout; what `pull` can fetch), containers/<id>/
(config.json, exit.json, log), volumes/<name>/.
"""
# What only some commands need is imported inside them, and paths are plain strings (pathlib
# would double the start-up): `ps` runs on every sparkrun status.
import contextlib
import fcntl
import json
import os
import re
import time
from os.path import join

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
    folder, name = os.path.split(path)
    tmp = join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_text(path):
    with open(path) as f:
        return f.read()


def read_json(path):
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError):
        return None


def remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
        self.root = str(root)
        self.dir = join(self.root, "docker")
        for sub in ("images", "registry", "containers", "volumes"):
            os.makedirs(join(self.dir, sub), exist_ok=True)

    @contextlib.contextmanager
    def lock(self):
        with open(join(self.dir, ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def fault(self, name):
        """Content of faults/<name> (a set fault), or None."""
        try:
            return read_text(join(self.root, "faults", name)).strip()
        except OSError:
            return None

    # -- call log ---------------------------------------------------------
    def record_call(self, argv):
        line = json.dumps({"ts": time.time(), "argv": argv}) + "\n"
        with open(join(self.dir, "calls.jsonl"), "a") as f:
            f.write(line)

    def calls(self):
        try:
            return [json.loads(line) for line in read_text(join(self.dir, "calls.jsonl")).splitlines()]
        except FileNotFoundError:
            return []

    def clear_calls(self):
        remove(join(self.dir, "calls.jsonl"))

    # -- images -----------------------------------------------------------
    def images(self, registry=False):
        folder = self.image_dir(registry)
        found = [read_json(join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(".json")]
        return sorted((i for i in found if i), key=lambda i: -i["Created"])

    def daemon_arch(self):
        """The daemon's platform architecture (GOARCH names, as `docker version` shows them):
        the simulated Sparks are arm64; the control machine's docker says what TESTBED_ARCH says."""
        return os.environ.get("TESTBED_ARCH", "arm64")

    def containerd_store(self):
        """True when this daemon uses the containerd image store: /etc/docker/daemon.json's
        {"features": {"containerd-snapshotter": true}}, here <state>/docker/daemon.json
        (https://docs.docker.com/engine/storage/containerd/)."""
        config = read_json(join(self.dir, "daemon.json")) or {}
        return bool(config.get("features", {}).get("containerd-snapshotter"))

    def shown_id(self, image):
        """`.Id` as this daemon reports it. The classic store shows the config digest; the
        containerd store shows the digest of the target descriptor (manifest or index), so the
        same image has two IDs on two daemons (docker/cli#5526, moby/moby#47674)."""
        if not self.containerd_store():
            return image["Id"]
        import hashlib

        return "sha256:" + hashlib.sha256(f"manifest:{image['Id']}".encode()).hexdigest()

    def find_image(self, ref, registry=False, arch=None):
        images = self.images(registry)
        tag = normalize_ref(ref)
        for image in images:
            if tag in image["RepoTags"] and arch in (None, image.get("Architecture", "arm64")):
                return image
        hexid = ref.removeprefix("sha256:").lower()
        if re.fullmatch(r"[0-9a-f]{4,64}", hexid):
            hits = [i for i in images if i["Id"][7:].startswith(hexid)]
            if len(hits) == 1:
                return hits[0]
        return None

    def image_dir(self, registry=False):
        return join(self.dir, "registry" if registry else "images")

    def payload_path(self, image, registry=False):
        return join(self.image_dir(registry), image["Id"][7:] + ".payload")

    def install_image(self, meta, chunks, registry=False):
        """Store an image; its id is sha256 of the payload unless meta has one."""
        folder = self.image_dir(registry)
        tmp = join(folder, f".payload.{os.getpid()}.tmp")
        import hashlib

        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        meta = dict(meta, Size=size)
        meta.setdefault("Id", "sha256:" + digest.hexdigest())
        meta.setdefault("Architecture", "arm64")
        meta.setdefault("Layers", ["sha256:" + digest.hexdigest()])  # RootFS diff IDs: the content
        meta.setdefault("Created", time.time())
        with self.lock():
            for tag in meta["RepoTags"]:
                # A registry tag may name one image per platform (a multi-arch index).
                self.untag(tag, registry, meta["Architecture"] if registry else None)
            old = read_json(join(folder, meta["Id"][7:] + ".json"))
            if old:
                meta["RepoTags"] = sorted(set(old["RepoTags"]) | set(meta["RepoTags"]))
            os.replace(tmp, join(folder, meta["Id"][7:] + ".payload"))
            write_json(join(folder, meta["Id"][7:] + ".json"), meta)
        return meta

    def tag_image(self, image, tag, registry=False):
        tag = normalize_ref(tag)
        path = join(self.image_dir(registry), image["Id"][7:] + ".json")
        with self.lock():
            self.untag(tag, registry)
            image = read_json(path)
            image["RepoTags"] = sorted(set(image["RepoTags"]) | {tag})
            write_json(path, image)

    def untag(self, tag, registry=False, arch=None):
        """Drop a tag from whichever image has it (caller holds the lock)."""
        for image in self.images(registry):
            if tag in image["RepoTags"] and arch in (None, image.get("Architecture", "arm64")):
                image["RepoTags"].remove(tag)
                write_json(join(self.image_dir(registry), image["Id"][7:] + ".json"), image)

    def remove_image(self, image):
        for suffix in (".json", ".payload"):
            remove(join(self.image_dir(), image["Id"][7:] + suffix))

    # -- containers -------------------------------------------------------
    def cdir(self, container):
        return join(self.dir, "containers", container["Id"])

    def containers(self):
        folder = join(self.dir, "containers")
        found = [read_json(join(folder, name, "config.json")) for name in os.listdir(folder)]
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
        os.makedirs(self.cdir(container), exist_ok=True)
        write_json(join(self.cdir(container), "config.json"), container)

    def delete_container(self, container):
        folder = self.cdir(container)
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                remove(join(folder, name))
            os.rmdir(folder)

    def log_path(self, container):
        return join(self.cdir(container), "log")

    def state(self, container):
        """Docker-like State dict, derived from the processes and exit.json."""
        done = read_json(join(self.cdir(container), "exit.json"))
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
