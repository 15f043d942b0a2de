"""Image commands: images, image inspect, pull, save, load, tag, rmi."""
import contextlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .args import parse, spec
from .common import (DockerError, ago, created_at, daemon_error, human_size, iso_time,
                     print_formatted, print_table)
from .store import normalize_ref


def offline_error(ref):
    """What the daemon says when the reference's registry cannot be reached (no DNS, no
    network), e.g. ggml-org/llama.cpp#10112: 'Error response from daemon: Get
    "https://ghcr.io/v2/": dial tcp: lookup ghcr.io on 192.168.1.254:53: no such host'. The
    registry is the reference's first component when it holds a dot or a colon or is
    localhost, else Docker Hub (distribution/reference, normalize.go)."""
    first, slash, _ = ref.partition("/")
    domain = first if slash and ("." in first or ":" in first or first == "localhost") else "registry-1.docker.io"
    return daemon_error(f'Get "https://{domain}/v2/": dial tcp: lookup {domain}: no such host')


IMAGES_SPEC = spec(bools="a,all q,quiet no-trunc digests", values="format", lists="f,filter")
INSPECT_SPEC = spec(values="f,format")
PULL_SPEC = spec(bools="q,quiet a,all-tags", values="platform")
SAVE_SPEC = spec(values="o,output platform")
LOAD_SPEC = spec(bools="q,quiet", values="i,input platform")
RMI_SPEC = spec(bools="f,force no-prune")
IMAGE_HEADERS = {"Repository": "REPOSITORY", "Tag": "TAG", "ID": "IMAGE ID",
                 "CreatedSince": "CREATED", "Size": "SIZE"}


def inspect_obj(store, image):
    return {"Id": store.shown_id(image), "RepoTags": image["RepoTags"],
            "RepoDigests": image.get("RepoDigests", []),
            "Created": iso_time(image["Created"]), "Size": image["Size"],
            "Architecture": image.get("Architecture", "arm64"), "Os": "linux",
            "RootFS": {"Type": "layers", "Layers": image.get("Layers", [])},
            "Config": {"Entrypoint": image.get("Entrypoint"), "Cmd": image.get("Cmd"),
                       "Env": image.get("Env", []), "Labels": image.get("Labels") or {}}}


def image_rows(store, image, trunc=True):
    shown = store.shown_id(image)
    tags = image["RepoTags"] or ["<none>:<none>"]
    for tag in tags:
        repo, _, name = tag.rpartition(":")
        yield {"Containers": "N/A", "CreatedAt": created_at(image["Created"]),
               "CreatedSince": ago(image["Created"]), "Digest": "<none>",
               "ID": shown[7:19] if trunc else shown, "Repository": repo,
               "SharedSize": "N/A", "Size": human_size(image["Size"]), "Tag": name,
               "UniqueSize": "N/A", "VirtualSize": human_size(image["Size"])}


def must_find(store, ref):
    image = store.find_image(ref)
    if not image:
        raise DockerError(f"Error response from daemon: No such image: {ref}")
    return image


def pull(store, ref, out, platform=None):
    """Copy an image from the host's pre-seeded registry; offline otherwise. A multi-arch tag
    gives the variant of --platform, else of the daemon's own platform; a tag without that
    variant fails as the registry's manifest list does."""
    arch = (platform or f"linux/{store.daemon_arch()}").split("/")[1]
    remote = store.find_image(ref, registry=True, arch=arch)
    if not remote:
        if store.find_image(ref, registry=True):
            raise daemon_error(f"no matching manifest for linux/{arch} in the manifest list entries")
        raise offline_error(ref)
    tag = normalize_ref(ref)
    local = store.find_image(ref)
    print(f"{tag.rpartition(':')[2]}: Pulling from {tag.rpartition(':')[0]}", file=out)
    print(f"Digest: {remote['Id']}", file=out)
    if local and local["Id"] == remote["Id"]:
        print(f"Status: Image is up to date for {tag}", file=out)
    else:
        with open(store.payload_path(remote, registry=True), "rb") as f:
            meta = {k: v for k, v in remote.items() if k != "Size"}
            # RepoDigests: the digest the registry serves for the tag (the index of a
            # multi-arch image), the same whichever variant was pulled.
            import hashlib

            index = hashlib.sha256(f"index:{tag}".encode()).hexdigest()
            meta["RepoDigests"] = [f"{tag.rpartition(':')[0]}@sha256:{index}"]
            store.install_image(dict(meta, RepoTags=[tag]), iter(lambda: f.read(1 << 20), b""))
        print(f"Status: Downloaded newer image for {tag}", file=out)
    print(f"docker.io/{tag}", file=out)
    return store.find_image(ref)


def ensure_local(store, ref, policy):
    """The image for `docker run`, pulling per --pull (always|missing|never)."""
    image = store.find_image(ref)
    if policy == "always" or (not image and policy == "missing"):
        if not image:
            print(f"Unable to find image '{normalize_ref(ref)}' locally", file=sys.stderr)
        try:
            return pull(store, ref, sys.stderr)
        except DockerError as exc:
            raise DockerError(str(exc), 125) from exc
    if not image:
        raise daemon_error(f"No such image: {normalize_ref(ref)}", 125)
    return image


def cmd_images(store, args):
    opts, pos = parse(args, IMAGES_SPEC)
    found = store.images()
    if pos:
        found = [i for i in found if any(t.rpartition(":")[0] == pos[0] or t == pos[0]
                                         for t in i["RepoTags"])]
    rows = [r for i in found for r in image_rows(store, i, not opts["no_trunc"])]
    if opts["quiet"]:
        for image_id in dict.fromkeys(r["ID"] for r in rows):
            print(image_id)
    elif opts["format"]:
        print_formatted(rows, opts["format"], IMAGE_HEADERS)
    else:
        print_table([list(IMAGE_HEADERS.values())] + [[r[k] for k in IMAGE_HEADERS] for r in rows])
    return 0


def cmd_image_inspect(store, args):
    opts, pos = parse(args, INSPECT_SPEC)
    if not pos:
        raise DockerError('"docker image inspect" requires at least 1 argument.', 1)
    found = [store.find_image(ref) for ref in pos]
    objs = [inspect_obj(store, i) for i in found if i]
    if opts["format"]:
        print_formatted(objs, opts["format"], {})
    else:
        print(json.dumps(objs, indent=4))
    missing = [ref for ref, image in zip(pos, found) if not image]
    if missing:
        raise DockerError("\n".join(f"Error response from daemon: No such image: {m}"
                                    for m in missing))
    return 0


def cmd_pull(store, args):
    opts, pos = parse(args, PULL_SPEC)
    if len(pos) != 1:
        raise DockerError('"docker pull" requires exactly 1 argument.', 1)
    pull(store, pos[0], sys.stdout, opts["platform"])
    return 0


def _add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cmd_save(store, args):
    opts, pos = parse(args, SAVE_SPEC)
    if not pos:
        raise DockerError('"docker save" requires at least 1 argument.', 1)
    manifest = []
    chosen = []
    for ref in pos:
        image = store.find_image(ref)
        if not image:
            raise daemon_error("reference does not exist")
        tag = normalize_ref(ref)
        chosen.append((image, [tag] if tag in image["RepoTags"] else []))
    out = (open(opts["output"], "wb") if opts["output"]
           else contextlib.nullcontext(sys.stdout.buffer))
    with out as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        for image, tags in chosen:
            hexid = image["Id"][7:]
            # What a load keeps: the config (architecture, content), not the registry digests.
            meta = {k: v for k, v in image.items() if k not in ("RepoTags", "Size", "RepoDigests")}
            _add_file(tar, f"{hexid}.json", json.dumps(meta).encode())
            tar.add(store.payload_path(image), arcname=f"{hexid}/layer.tar")
            manifest.append({"Config": f"{hexid}.json", "RepoTags": tags,
                             "Layers": [f"{hexid}/layer.tar"]})
        _add_file(tar, "manifest.json", json.dumps(manifest).encode())
    return 0


def extract(tar, work):
    """Extract the regular files of a streamed tar below work."""
    for member in tar:
        target = (work / member.name).resolve()
        if not member.isfile():
            continue
        if not target.is_relative_to(work):
            raise daemon_error(f"invalid path in archive: {member.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def cmd_load(store, args):
    opts, _pos = parse(args, LOAD_SPEC)
    source = (open(opts["input"], "rb") if opts["input"]
              else contextlib.nullcontext(sys.stdin.buffer))
    work = Path(tempfile.mkdtemp(prefix=".load-", dir=store.dir))
    try:
        try:
            with source as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                extract(tar, work)
        except tarfile.ReadError:
            raise DockerError("requested load from stdin, but stdin is empty"
                              if not any(work.iterdir()) else
                              "Error response from daemon: unexpected EOF")
        if not (work / "manifest.json").exists():
            raise daemon_error("open manifest.json: no such file or directory")
        for entry in json.loads((work / "manifest.json").read_text()):
            meta = json.loads((work / entry["Config"]).read_text())
            with open(work / entry["Layers"][0], "rb") as f:
                image = store.install_image(dict(meta, RepoTags=entry["RepoTags"]),
                                           iter(lambda: f.read(1 << 20), b""))
            for tag in entry["RepoTags"]:
                print(f"Loaded image: {tag}")
            if not entry["RepoTags"]:
                print(f"Loaded image ID: {image['Id']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def cmd_tag(store, args):
    _opts, pos = parse(args, spec())
    if len(pos) != 2:
        raise DockerError('"docker tag" requires exactly 2 arguments.', 1)
    store.tag_image(must_find(store, pos[0]), pos[1])
    return 0


def cmd_rmi(store, args):
    opts, pos = parse(args, RMI_SPEC)
    if not pos:
        raise DockerError('"docker rmi" requires at least 1 argument.', 1)
    for ref in pos:
        image = must_find(store, ref)
        tag = normalize_ref(ref)
        if tag in image["RepoTags"] and len(image["RepoTags"]) > 1:
            with store.lock():
                store.untag(tag)
            print(f"Untagged: {tag}")
            continue
        users = [c for c in store.containers() if c["ImageID"] == image["Id"]]
        if users and not opts["force"]:
            raise daemon_error(f'conflict: unable to remove repository reference "{ref}" '
                               f"(must force) - container {users[0]['Id'][:12]} is using its "
                               f"referenced image {image['Id'][7:19]}")
        for t in image["RepoTags"]:
            print(f"Untagged: {t}")
        store.remove_image(image)
        print(f"Deleted: {image['Id']}")
    return 0
