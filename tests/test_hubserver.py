"""The fake Hub in hubserver.py, checked against the real huggingface_hub client.

Every download runs in a subprocess because huggingface_hub reads HF_ENDPOINT (and HF_HOME,
HF_HUB_OFFLINE, ...) once, at import time, into huggingface_hub.constants. The environment each
subprocess gets (see the `hf_home` fixture):

    HF_ENDPOINT=http://127.0.0.1:<port>   the fake Hub
    HF_HOME=<tmp_path>/hf                 so the cache is <tmp_path>/hf/hub
    HF_HUB_DISABLE_TELEMETRY=1
    HF_HUB_DISABLE_PROGRESS_BARS=1        quiet stderr
    NO_PROXY=127.0.0.1,localhost          never route the fake Hub through a proxy
    no other HF_* variable; in particular HF_HUB_OFFLINE and HF_TOKEN are unset

HF_HUB_DISABLE_XET is not needed: the fake Hub never sends X-Xet-* headers nor tree entries
with a xetHash, which is all huggingface_hub looks at to choose Xet, so even with hf_xet
installed every file comes over plain HTTP (test_no_xet_metadata_is_advertised checks it).
"""

import hashlib
import http.client
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubserver import FakeHub, git_blob_sha1, make_gguf_repo, make_safetensors_repo

ST = "org/tiny-model"
GGUF = "unsloth/Qwen3-1.7B-GGUF"
SPLIT = ["Q4_K_M/Qwen3-1.7B-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/Qwen3-1.7B-Q4_K_M-00002-of-00002.gguf"]

# Runs huggingface_hub calls given as JSON [[function name, args, kwargs], ...] and prints one JSON
# result per call: {"result": ...} or {"error": exception class name, "message": first line}.
RUNNER = r"""
import json, sys, types
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.utils._runtime import is_xet_available

def plain(value):
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple, types.GeneratorType)):
        return [plain(v) for v in value]
    return getattr(value, "path", None) or repr(value)

out = {"endpoint": constants.ENDPOINT, "xet_available": is_xet_available(), "calls": []}
for name, args, kwargs in json.loads(sys.argv[1]):
    try:
        out["calls"].append({"result": plain(getattr(huggingface_hub, name)(*args, **kwargs))})
    except Exception as exc:
        out["calls"].append({"error": type(exc).__name__, "message": (str(exc).splitlines() or [""])[0]})
print(json.dumps(out))
"""


@pytest.fixture
def repos():
    return {ST: make_safetensors_repo(n_files=2, size=48 * 1024), GGUF: make_gguf_repo(size=48 * 1024)}


@pytest.fixture
def hub(repos):
    with FakeHub(repos) as server:
        yield server


@pytest.fixture
def hf_home(monkeypatch, tmp_path, hub):
    """Points this process's environment (inherited by the subprocesses) at the fake Hub."""
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGINGFACE_")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path / "hf"


def hf(*calls, hub: FakeHub) -> list:
    """Run huggingface_hub calls (name, args, kwargs) in one fresh interpreter; their results in order."""
    spec = json.dumps([[name, list(args), kwargs] for name, args, kwargs in calls])
    proc = subprocess.run([sys.executable, "-c", RUNNER, spec], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["endpoint"] == hub.url  # HF_ENDPOINT reached the client
    return out["calls"]


def call(name, *args, **kwargs):
    return name, args, kwargs


def snapshot_files(snapshot: Path) -> dict:
    return {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if not p.is_dir()}


def request(hub: FakeHub, method: str, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --- the real client against the fake Hub ----------------------------------------------------------

def test_snapshot_download_builds_the_standard_cache(hub, hf_home, repos):
    sha = repos[ST]["revision"]
    cache = hf_home / "hub"
    [res] = hf(call("snapshot_download", ST, revision="main", cache_dir=str(cache)), hub=hub)
    repo_dir = cache / "models--org--tiny-model"
    snapshot = repo_dir / "snapshots" / sha
    assert res == {"result": str(snapshot)}
    assert (repo_dir / "refs" / "main").read_text() == sha
    assert snapshot_files(snapshot) == repos[ST]["files"]

    blobs = {p.name for p in (repo_dir / "blobs").iterdir()}
    assert blobs == {hub.etag(ST, path) for path in repos[ST]["files"]}
    for path in repos[ST]["files"]:
        link = snapshot / path
        assert link.is_symlink()
        target = os.readlink(link)
        assert not os.path.isabs(target) and target == f"../../blobs/{hub.etag(ST, path)}"
    # weights are LFS files (cached under their sha256), small text files are named by git blob sha1
    shard = "model-00001-of-00002.safetensors"
    assert hub.etag(ST, shard) == hashlib.sha256(repos[ST]["files"][shard]).hexdigest()
    assert hub.etag(ST, "config.json") == git_blob_sha1(repos[ST]["files"]["config.json"])

    n = len(repos[ST]["files"])
    assert hub.requests[:2] == [("GET", f"/api/models/{ST}/revision/main"), ("GET", f"/api/models/{ST}/tree/{sha}")]
    assert sorted(hub.requests[2:]) == sorted([("HEAD", f"/{ST}/resolve/{sha}/{p}") for p in repos[ST]["files"]]
                                              + [("GET", f"/{ST}/resolve/{sha}/{p}") for p in repos[ST]["files"]])
    assert len(hub.requests) == 2 + 2 * n
    assert all(entry["status"] == 200 for entry in hub.log)


def test_allow_patterns_downloads_only_the_split_quant(hub, hf_home, repos):
    sha = repos[GGUF]["revision"]
    [res] = hf(call("snapshot_download", GGUF, revision="main", allow_patterns=["*Q4_K_M*"],
                    cache_dir=str(hf_home / "hub")), hub=hub)
    snapshot = Path(res["result"])
    assert snapshot == hf_home / "hub" / "models--unsloth--Qwen3-1.7B-GGUF" / "snapshots" / sha
    assert snapshot_files(snapshot) == {p: repos[GGUF]["files"][p] for p in SPLIT}
    assert os.readlink(snapshot / SPLIT[0]) == f"../../../blobs/{hub.etag(GGUF, SPLIT[0])}"
    assert sorted(hub.content_gets()) == [f"/{GGUF}/resolve/{sha}/{p}" for p in SPLIT]


def test_hf_hub_download_config_json(hub, hf_home, repos):
    sha = repos[ST]["revision"]
    by_branch, by_sha = hf(call("hf_hub_download", ST, "config.json", revision="main"),
                           call("hf_hub_download", ST, "config.json", revision=sha), hub=hub)
    path = hf_home / "hub" / "models--org--tiny-model" / "snapshots" / sha / "config.json"
    assert by_branch == by_sha == {"result": str(path)}
    assert path.read_bytes() == repos[ST]["files"]["config.json"]
    assert json.loads(path.read_bytes())["num_hidden_layers"] == 28
    assert (path.parent.parent.parent / "refs" / "main").read_text() == sha
    # by commit sha with the file already cached, the client does not ask the Hub again
    assert hub.requests == [("HEAD", f"/{ST}/resolve/main/config.json"), ("GET", f"/{ST}/resolve/main/config.json")]


def test_second_snapshot_download_fetches_no_content(hub, hf_home, repos):
    cache = str(hf_home / "hub")
    [first] = hf(call("snapshot_download", ST, revision="main", cache_dir=cache), hub=hub)
    assert len(hub.content_gets()) == len(repos[ST]["files"])
    hub.clear()
    [second] = hf(call("snapshot_download", ST, revision="main", cache_dir=cache), hub=hub)
    assert second == first
    assert hub.content_gets() == []
    # only the revision lookup: the tree listing is cached on disk and every file is already in place
    assert hub.requests == [("GET", f"/api/models/{ST}/revision/main")]


def test_interrupted_download_resumes_with_a_range_request(hub, hf_home):
    # huggingface_hub writes in 10 MiB chunks and resumes from what it wrote, so cut after 10 MiB.
    # It also waits 1 s before resuming.
    repo = make_safetensors_repo(n_files=1, size=11 * 1024 * 1024, seed="big")
    hub.add_repo("org/big", repo)
    shard = "model-00001-of-00001.safetensors"
    hub.cut_next_download("org/big", shard, 10 * 1024 * 1024 + 4096)
    [res] = hf(call("hf_hub_download", "org/big", shard, revision="main"), hub=hub)
    assert Path(res["result"]).read_bytes() == repo["files"][shard]
    gets = [e for e in hub.log if e["method"] == "GET"]
    size = len(repo["files"][shard])
    assert [(e["status"], e["range"]) for e in gets] == [(200, None), (206, f"bytes={10 * 1024 * 1024}-")]
    assert gets[0]["sent"] == 10 * 1024 * 1024 + 4096 and gets[1]["sent"] == size - 10 * 1024 * 1024


def test_missing_repo_file_and_revision_raise_the_client_errors(hub, hf_home):
    results = hf(call("snapshot_download", "org/nope"),
                 call("hf_hub_download", "org/nope", "config.json"),
                 call("hf_hub_download", ST, "nope.json"),
                 call("hf_hub_download", ST, "config.json", revision="v9"),
                 call("snapshot_download", ST, revision="v9"), hub=hub)
    assert [r.get("error") for r in results] == ["RepositoryNotFoundError", "RepositoryNotFoundError",
                                                 "RemoteEntryNotFoundError", "RevisionNotFoundError",
                                                 "RevisionNotFoundError"]
    assert hub.content_gets() == []


def test_client_follows_tree_pagination(hub, hf_home, repos):
    hub.tree_page_size = 2
    listing, snap = hf(call("list_repo_tree", GGUF, recursive=True),
                       call("snapshot_download", GGUF, cache_dir=str(hf_home / "hub")), hub=hub)
    assert sorted(listing["result"]) == sorted(list(repos[GGUF]["files"]) + ["Q4_K_M"])
    assert snapshot_files(Path(snap["result"])) == repos[GGUF]["files"]
    cursors = [e for e in hub.log if "/tree/" in e["path"] and "cursor=" in e["query"]]
    assert len(cursors) == 2 * 3  # 7 entries in pages of 2: 3 follow-up pages per listing


# --- the server itself, over plain HTTP ------------------------------------------------------------

def test_no_xet_metadata_is_advertised(hub):
    sha = hub.commit(ST)
    for path in ("config.json", "model-00001-of-00002.safetensors"):
        status, headers, _ = request(hub, "HEAD", f"/{ST}/resolve/main/{path}")
        assert status == 200 and not any(k.startswith("x-xet") for k in headers) and "link" not in headers
    _, _, body = request(hub, "GET", f"/api/models/{ST}/tree/{sha}?recursive=true")
    assert all("xetHash" not in entry for entry in json.loads(body))


def test_resolve_headers(hub, repos):
    sha, data = repos[ST]["revision"], repos[ST]["files"]
    status, h, body = request(hub, "HEAD", f"/{ST}/resolve/main/config.json")
    assert (status, body) == (200, b"")
    assert h["x-repo-commit"] == sha and h["etag"] == f'"{git_blob_sha1(data["config.json"])}"'
    assert h["content-length"] == str(len(data["config.json"])) and "x-linked-etag" not in h
    shard = "model-00002-of-00002.safetensors"
    status, h, body = request(hub, "GET", f"/{ST}/resolve/{sha}/{shard}")
    sha256 = hashlib.sha256(data[shard]).hexdigest()
    assert status == 200 and body == data[shard]
    assert h["etag"] == h["x-linked-etag"] == f'"{sha256}"' and h["x-linked-size"] == str(len(data[shard]))
    assert h["accept-ranges"] == "bytes"


def test_range_requests(hub, repos):
    data = repos[GGUF]["files"][SPLIT[1]]
    url = f"/{GGUF}/resolve/main/{SPLIT[1]}"
    status, h, body = request(hub, "GET", url, {"Range": "bytes=1000-"})
    assert (status, body) == (206, data[1000:])
    assert h["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert h["content-length"] == str(len(data) - 1000)
    assert request(hub, "GET", url, {"Range": "bytes=10-19"})[2] == data[10:20]
    assert request(hub, "GET", url, {"Range": "bytes=-5"})[2] == data[-5:]
    status, h, _ = request(hub, "GET", url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(data)}"
    assert hub.log[0]["range"] == "bytes=1000-" and hub.log[0]["status"] == 206


def test_errors_carry_the_hub_error_codes(hub):
    sha = hub.commit(ST)
    cases = {
        "/org/nope/resolve/main/config.json": "RepoNotFound",
        "/api/models/org/nope": "RepoNotFound",
        "/api/models/org/nope/revision/main": "RepoNotFound",
        f"/{ST}/resolve/main/missing.bin": "EntryNotFound",
        f"/{ST}/resolve/v2/config.json": "RevisionNotFound",
        f"/api/models/{ST}/revision/v2": "RevisionNotFound",
        f"/api/models/{ST}/tree/main/no-such-dir": "EntryNotFound",
    }
    for path, code in cases.items():
        for method in ("HEAD", "GET"):
            status, h, _ = request(hub, method, path)
            assert (status, h.get("x-error-code")) == (404, code), (method, path)
    assert request(hub, "HEAD", f"/{ST}/resolve/main/missing.bin")[1]["x-repo-commit"] == sha
    assert request(hub, "GET", "/something/else")[0] == 404


def test_model_info_and_tree_listing(hub, repos):
    sha = repos[GGUF]["revision"]
    status, _, body = request(hub, "GET", f"/api/models/{GGUF}")
    info = json.loads(body)
    assert status == 200 and info["id"] == GGUF and info["sha"] == sha
    assert sorted(s["rfilename"] for s in info["siblings"]) == sorted(repos[GGUF]["files"])
    info = json.loads(request(hub, "GET", f"/api/models/{GGUF}/revision/{sha}?blobs=true")[2])
    sibling = next(s for s in info["siblings"] if s["rfilename"] == SPLIT[0])
    assert sibling["size"] == len(repos[GGUF]["files"][SPLIT[0]]) and sibling["lfs"]["sha256"] == hub.etag(GGUF, SPLIT[0])

    top = json.loads(request(hub, "GET", f"/api/models/{GGUF}/tree/main")[2])
    assert {(e["type"], e["path"]) for e in top} >= {("directory", "Q4_K_M"), ("file", "Qwen3-1.7B-Q8_0.gguf")}
    assert not any(e["path"].startswith("Q4_K_M/") for e in top)
    sub = json.loads(request(hub, "GET", f"/api/models/{GGUF}/tree/main/Q4_K_M")[2])
    assert [e["path"] for e in sub] == SPLIT and all(e["lfs"]["size"] == e["size"] for e in sub)


def test_request_log_delay_add_repo_and_stop():
    hub = FakeHub({ST: make_safetensors_repo(n_files=1, size=1024)}, delay_s=0.2)
    url = hub.start()
    assert url.startswith("http://127.0.0.1:")
    t0 = time.monotonic()
    assert request(hub, "GET", f"/api/models/{ST}")[0] == 200
    assert time.monotonic() - t0 >= 0.2
    hub.delay_s = 0
    old = hub.commit(ST)
    new = hub.add_repo(ST, make_safetensors_repo(n_files=1, size=1024, seed=1))  # a push to main
    assert new != old
    assert json.loads(request(hub, "GET", f"/api/models/{ST}/revision/main")[2])["sha"] == new
    assert request(hub, "HEAD", f"/{ST}/resolve/{old}/config.json")[1]["x-error-code"] == "RevisionNotFound"
    assert hub.requests == [("GET", f"/api/models/{ST}"), ("GET", f"/api/models/{ST}/revision/main"),
                            ("HEAD", f"/{ST}/resolve/{old}/config.json")]
    hub.add_repo("org/names", {"files": {"données/é.txt": b"x", "a b/c+d.json": b"{}"}, "refs": ["v1.0"]})
    assert json.loads(request(hub, "GET", "/api/models/org/names/revision/v1.0")[2])["sha"] == hub.commit("org/names")
    assert request(hub, "GET", "/org/names/resolve/main/donn%C3%A9es/%C3%A9.txt")[:3:2] == (200, b"x")
    assert request(hub, "GET", "/org/names/resolve/main/a%20b/c%2Bd.json")[2] == b"{}"

    port = int(url.rsplit(":", 1)[1])
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # a kept-alive connection
    kept.request("GET", f"/api/models/{ST}")
    assert kept.getresponse().read()
    hub.stop()
    with pytest.raises(OSError):
        request(hub, "GET", f"/api/models/{ST}")
    with pytest.raises((OSError, http.client.HTTPException)):
        kept.request("GET", f"/api/models/{ST}")
        kept.getresponse()
    kept.close()


def test_repo_helpers_make_realistic_files():
    repo = make_safetensors_repo(n_files=3, size=8192)
    files = repo["files"]
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", *shards} <= set(files)
    index = json.loads(files["model.safetensors.index.json"])
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        (n,) = struct.unpack("<Q", files[shard][:8])
        header = json.loads(files[shard][8:8 + n])
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
        assert len(files[shard]) == 8 + n + max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    assert index["metadata"]["total_size"] == total
    assert make_safetensors_repo(n_files=3, size=8192) == repo  # deterministic
    assert len(repo["revision"]) == 40

    gguf = make_gguf_repo()["files"]
    assert {"Qwen3-1.7B-Q8_0.gguf", *SPLIT} <= set(gguf)
    for path in ("Qwen3-1.7B-Q8_0.gguf", *SPLIT):
        assert gguf[path][:4] == b"GGUF" and struct.unpack("<I", gguf[path][4:8]) == (3,)
    assert b"split.count" in gguf[SPLIT[0]] and b"split.count" not in gguf["Qwen3-1.7B-Q8_0.gguf"]
