"""A small fake Hugging Face Hub HTTP server for tests (standard library only).

It serves just enough of the Hub's HTTP API for the real ``huggingface_hub`` client to run
``snapshot_download`` and ``hf_hub_download`` against it when ``HF_ENDPOINT`` points at it:

    GET  /api/models/{repo_id}                       model info (``sha``, ``siblings``)
    GET  /api/models/{repo_id}/revision/{revision}   same, at a revision
    GET  /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=&expand=&cursor=
                                                     tree listing, paginated with a ``Link: rel="next"`` header
    HEAD /{repo_id}/resolve/{revision}/{path}        file metadata headers
    GET  /{repo_id}/resolve/{revision}/{path}        file content; ``Range: bytes=...`` answers 206

Files whose name ends like a weight file (``.safetensors``, ``.gguf``, ...) or that are 10 MiB or
larger are treated as Git LFS files, as on the Hub: their ETag is the content's sha256 and the
response also carries ``X-Linked-Etag`` / ``X-Linked-Size``; other files get the git blob sha1
as ETag. No Xet headers are ever sent and tree entries carry no ``xetHash``, so the client
always downloads over plain HTTP from this server (``HF_HUB_DISABLE_XET`` is not needed).

Errors are 404s with ``X-Error-Code`` set to ``RepoNotFound``, ``RevisionNotFound`` or
``EntryNotFound``, which ``huggingface_hub`` maps to its own exception types.

Environment for a huggingface_hub process that should use this server (the client reads these
once, at import time, so run downloads in a subprocess started with them)::

    HF_ENDPOINT=<FakeHub.url>      required
    HF_HOME=<a temporary dir>      so the cache is <HF_HOME>/hub
    HF_HUB_OFFLINE                 must be unset (or 0)
    HF_HUB_DISABLE_TELEMETRY=1     recommended; HF_HUB_DISABLE_PROGRESS_BARS=1 keeps stderr quiet
    NO_PROXY=127.0.0.1             if the environment may define HTTP(S)_PROXY

Usage::

    with FakeHub({"org/model": make_safetensors_repo()}) as hub:
        env = {"HF_ENDPOINT": hub.url, ...}
        ...
        assert ("GET", "/api/models/org/model/revision/main") in hub.requests

Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["FakeHub", "make_safetensors_repo", "make_gguf_repo", "git_blob_sha1", "pseudo_random_bytes"]

HOST = "127.0.0.1"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Extensions the Hub's default .gitattributes sends to LFS (the ones a model repo is likely to hold).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                ".ot", ".model", ".tflite", ".npy", ".npz", ".pkl", ".zip", ".tar", ".gz", ".zst")
LFS_MIN_SIZE = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000  # the Hub's page size for a tree listing (50 with expand=true)
CHUNK = 256 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pseudo_random_bytes(n: int, seed: object = 0) -> bytes:
    """n deterministic pseudo-random bytes for a given seed."""
    return random.Random(str(seed)).randbytes(n)


def _is_lfs(path: str, size: int) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


class _File:
    """A file of a repo with the metadata the Hub reports for it."""

    __slots__ = ("path", "data", "size", "lfs", "sha256", "git_oid", "pointer_size", "etag")

    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.size = path, data, len(data)
        self.lfs = _is_lfs(path, self.size)
        self.sha256 = hashlib.sha256(data).hexdigest() if self.lfs else None
        if self.lfs:
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                       f"size {self.size}\n").encode()
            self.git_oid, self.pointer_size = git_blob_sha1(pointer), len(pointer)
        else:
            self.git_oid, self.pointer_size = git_blob_sha1(data), None
        # What the client names the blob in its cache: sha256 for LFS files, git sha1 otherwise.
        self.etag = self.sha256 if self.lfs else self.git_oid


class _Repo:
    __slots__ = ("repo_id", "sha", "refs", "files", "dirs")

    def __init__(self, repo_id: str, spec: dict):
        if not isinstance(spec, dict) or "files" not in spec:
            raise ValueError(f"{repo_id}: a repo is {{'revision': <40-hex sha>, 'files': {{path: bytes}}}}")
        files = spec["files"]
        sha = spec.get("revision") or commit_sha_for(files)
        if not COMMIT_RE.match(sha):
            raise ValueError(f"{repo_id}: revision must be a 40-hex commit sha, got {sha!r}")
        self.repo_id, self.sha = repo_id, sha
        self.refs = set(spec.get("refs") or ()) | {"main"}
        self.files: dict[str, _File] = {}
        self.dirs: set[str] = set()
        for path, data in sorted(files.items()):
            path = path.strip("/")
            if isinstance(data, str):
                data = data.encode()
            if not path or ".." in path.split("/"):
                raise ValueError(f"{repo_id}: bad file path {path!r}")
            self.files[path] = _File(path, bytes(data))
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                self.dirs.add("/".join(parts[:i]))

    def resolve(self, revision: str) -> str | None:
        return self.sha if revision == self.sha or revision in self.refs else None


def commit_sha_for(files: dict) -> str:
    """A deterministic commit sha derived from a repo's file listing."""
    h = hashlib.sha1()
    for path in sorted(files):
        data = files[path]
        h.update(path.encode() + b"\0" + git_blob_sha1(data.encode() if isinstance(data, str) else data).encode())
    return h.hexdigest()


class FakeHub:
    """A fake Hub on 127.0.0.1 serving `repos` ({repo_id: {"revision": sha, "files": {path: bytes}}}).

    "revision" may be omitted (a sha is then derived from the files). A repo spec may also list
    extra branch/tag names under "refs" (["v1.0"]) that resolve to its commit; "main" always does.
    File paths use "/" and may contain folders; values are bytes (str is encoded as UTF-8).
    Only model repos are served (no /datasets/ or /spaces/ routes). Attributes meant for tests:

    - `url`: "http://127.0.0.1:<port>" once started (the value for HF_ENDPOINT)
    - `requests`: [(method, path)] in arrival order; path is URL-decoded, without query string
    - `log`: one dict per request: method, path, query, range, status, sent (body bytes written)
    - `delay_s`: seconds to sleep before answering each request (may be changed at any time)
    - `tree_page_size`: entries per tree page (the Hub uses 1000); lower it to force pagination
    """

    def __init__(self, repos: dict | None = None, *, delay_s: float = 0.0, tree_page_size: int = TREE_PAGE_SIZE):
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        for repo_id, spec in (repos or {}).items():
            self.add_repo(repo_id, spec)
        self.delay_s = delay_s
        self.tree_page_size = tree_page_size
        self.requests: list[tuple[str, str]] = []
        self.log: list[dict] = []
        self._cuts: dict[tuple[str, str], int] = {}
        self._conns: set = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    # --- repos -----------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, spec: dict) -> str:
        """Add (or replace, as a push to main would) a repo; returns its commit sha."""
        repo = _Repo(repo_id, spec)
        with self._lock:
            self._repos[repo_id] = repo
        return repo.sha

    def remove_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def commit(self, repo_id: str) -> str:
        return self._repos[repo_id].sha

    def etag(self, repo_id: str, path: str) -> str:
        """The blob name the client's cache will use for this file."""
        return self._repos[repo_id].files[path].etag

    def cut_next_download(self, repo_id: str, path: str, after_bytes: int) -> None:
        """Make the next GET of this file send only `after_bytes` of its body, then drop the connection
        (the headers still announce the full length), so the client has to resume with a Range request."""
        with self._lock:
            self._cuts[(repo_id, path)] = after_bytes

    # --- request log helpers ----------------------------------------------------------------------

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.log.clear()

    def content_gets(self) -> list[str]:
        """Paths of the GET requests for file content (/{repo}/resolve/...)."""
        return [path for method, path in list(self.requests) if method == "GET" and "/resolve/" in path]

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> str:
        if self._server is not None:
            return self.url
        self._server = _Server((HOST, 0), _handler_for(self))
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop listening and drop every open connection, kept-alive ones included."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- internals used by the handler ---------------------------------------------------------

    def _record(self, entry: dict) -> None:
        with self._lock:
            self.requests.append((entry["method"], entry["path"]))
            self.log.append(entry)

    def _find_repo(self, segments: list[str]) -> tuple[str, _Repo | None, list[str]]:
        """Split URL path segments into (repo_id, repo or None, rest). Unknown repos are taken as org/name."""
        with self._lock:
            repos = dict(self._repos)
        for k in (2, 1):
            repo_id = "/".join(segments[:k])
            if repo_id in repos and len(segments) >= k:
                return repo_id, repos[repo_id], segments[k:]
        return "/".join(segments[:2]), None, segments[2:]

    def _take_cut(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop((repo_id, path), None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client hanging up (or stop() dropping its connection) is routine here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _handler_for(hub: FakeHub):
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    hub: FakeHub

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._conns.discard(self.connection)

    # --- dispatch -------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch(head=False)

    def do_HEAD(self):
        self._dispatch(head=True)

    def _unsupported(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._entry = self._new_entry()
        self.hub._record(self._entry)
        self._error(405, None, f"{self.command} is not supported by this fake Hub")

    do_POST = do_PUT = do_DELETE = do_PATCH = _unsupported

    def _new_entry(self) -> dict:
        split = urlsplit(self.path)
        return {"method": self.command, "path": unquote(split.path), "query": split.query,
                "range": self.headers.get("Range"), "status": None, "sent": 0}

    def _dispatch(self, head: bool):
        # Recorded on arrival (status and byte count are filled in before they go out), so the log is
        # complete by the time a client has seen the answer.
        self._entry = self._new_entry()
        self.hub._record(self._entry)
        if self.hub.delay_s:
            time.sleep(self.hub.delay_s)
        split = urlsplit(self.path)
        segments = [s for s in split.path.split("/") if s]
        query = parse_qs(split.query)
        try:
            if segments[:2] == ["api", "models"] and len(segments) > 2:
                self._api_models(segments[2:], query, head)
            elif len(segments) >= 4 and "resolve" in segments[1:3]:
                self._resolve(segments, head)
            else:
                self._error(404, None, "Not found", head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # --- /api/models/... ---------------------------------------------------------------------------

    def _api_models(self, segments: list[str], query: dict, head: bool):
        segments = [unquote(s) for s in segments]
        repo_id, repo, rest = self.hub._find_repo(segments)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
        if not rest:
            return self._model_info(repo, "main", query, head)
        if rest[0] == "revision" and len(rest) >= 2:
            return self._model_info(repo, "/".join(rest[1:]), query, head)
        if rest[0] == "tree" and len(rest) >= 2:
            return self._tree(repo, rest[1], "/".join(rest[2:]), query, head)
        return self._error(404, None, "Not found", head=head)

    def _model_info(self, repo: _Repo, revision: str, query: dict, head: bool):
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        with_blobs = _truthy(query.get("blobs"))
        siblings = []
        for f in repo.files.values():
            sibling = {"rfilename": f.path}
            if with_blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        org = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": org,
            "sha": sha,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "gguf" if any(p.endswith(".gguf") for p in repo.files) else "transformers",
            "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        expand = query.get("expand") or query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        self._json(200, info, head=head)

    def _tree(self, repo: _Repo, revision: str, path: str, query: dict, head: bool):
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        path = path.strip("/")
        if path and path not in repo.dirs:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", head=head)
        recursive, expand = _truthy(query.get("recursive")), _truthy(query.get("expand"))
        prefix = path + "/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        entries = [{"type": "directory", "oid": hashlib.sha1(f"tree {sha} {d}".encode()).hexdigest(),
                    "size": 0, "path": d} for d in sorted(repo.dirs) if wanted(d)]
        for f in repo.files.values():
            if wanted(f.path):
                entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                entries.append(entry)
        page_size = max(1, min(self.hub.tree_page_size, 50) if expand else self.hub.tree_page_size)
        start = _decode_cursor(query.get("cursor"))
        page = entries[start:start + page_size]
        headers = {}
        if start + page_size < len(entries):
            params = {k: v[-1] for k, v in query.items() if k != "cursor"}
            params["cursor"] = base64.urlsafe_b64encode(str(start + page_size).encode()).decode()
            split = urlsplit(self.path)
            host = self.headers.get("Host") or f"{HOST}:{self.server.server_address[1]}"
            headers["Link"] = f'<http://{host}{split.path}?{urlencode(params)}>; rel="next"'
        self._json(200, page, head=head, headers=headers)

    # --- /{repo_id}/resolve/{revision}/{path} ---------------------------------------------------

    def _resolve(self, segments: list[str], head: bool):
        k = 2 if len(segments) > 3 and segments[2] == "resolve" else 1
        repo_id = "/".join(unquote(s) for s in segments[:k])
        revision = unquote(segments[k + 1])
        path = unquote("/".join(segments[k + 2:]))
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"Entry not found: {path}", head=head,
                               headers={"X-Repo-Commit": sha})
        name = path.rsplit("/", 1)[-1]
        ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
        headers = {
            "Content-Type": _content_type(path),
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        status, start, end = 200, 0, f.size
        rng = self.headers.get("Range")
        if rng and not head:
            parsed = _parse_range(rng, f.size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{f.size}"
                return self._send(416, headers, b"", head=head)
            if parsed is not None:
                status, (start, end) = 206, parsed
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        cut = None if head else self.hub._take_cut(repo_id, path)
        self._send(status, headers, f.data, head=head, start=start, end=end, cut=cut)

    # --- responses ----------------------------------------------------------------------------------

    def _json(self, status: int, payload, *, head: bool = False, headers: dict | None = None):
        body = json.dumps(payload).encode()
        self._send(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body, head=head)

    def _error(self, status: int, code: str | None, message: str, *, head: bool = False,
               headers: dict | None = None):
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, head=head, headers=extra)

    def _send(self, status: int, headers: dict, body: bytes, *, head: bool = False,
              start: int = 0, end: int | None = None, cut: int | None = None):
        end = len(body) if end is None else end
        self._entry["status"] = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            return
        stop = end if cut is None else min(end, start + cut)
        view = memoryview(body)
        for offset in range(start, stop, CHUNK):
            piece = view[offset:min(offset + CHUNK, stop)]
            self._entry["sent"] += len(piece)
            self.wfile.write(piece)
        self.wfile.flush()
        if cut is not None and stop < end:
            self.close_connection = True  # the body is short of its Content-Length: the client sees a broken transfer


def _truthy(values) -> bool:
    return bool(values) and str(values[-1]).lower() in ("1", "true", "yes")


def _decode_cursor(values) -> int:
    if not values:
        return 0
    try:
        return max(0, int(base64.urlsafe_b64decode(values[-1].encode()).decode()))
    except ValueError:
        return 0


def _parse_range(header: str, size: int):
    """(start, end_exclusive) for a single `bytes=` range, "unsatisfiable", or None to ignore it."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multiple ranges: serve the whole file, as servers may
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        return "unsatisfiable" if n == 0 else (max(0, size - n), size)
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = size if not last else min(size, int(last) + 1)
    return None if end <= start else (start, end)


def _content_type(path: str) -> str:
    if path.endswith(".json"):
        return "application/json"
    if path.endswith((".md", ".txt", ".gitattributes")) or path.endswith("/.gitattributes"):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


# --- realistic repos ---------------------------------------------------------------------------------

GITATTRIBUTES = b"".join(
    f"*{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in (".7z", ".arrow", ".bin", ".gguf", ".h5", ".msgpack", ".onnx", ".pt", ".pth", ".safetensors", ".zip")
)

QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "vocab_size": 151936,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _safetensors_file(tensors: dict[str, bytes]) -> bytes:
    """A valid safetensors file of U8 tensors (8-byte header length, JSON header, data)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values())


def make_safetensors_repo(n_files: int = 2, size: int = 64 * 1024, *, seed: object = 0,
                          config: dict | None = None, revision: str | None = None) -> dict:
    """A transformers-style repo: .gitattributes, config.json, generation_config.json, tokenizer.json,
    tokenizer_config.json, model.safetensors.index.json (metadata.total_size and weight_map) and
    model-0000X-of-0000N.safetensors shards of about `size` bytes each, valid safetensors files."""
    files: dict[str, bytes] = {
        ".gitattributes": GITATTRIBUTES,
        "config.json": _json_bytes(config if config is not None else QWEN3_CONFIG),
        "generation_config.json": _json_bytes({"bos_token_id": 151643, "eos_token_id": 151645}),
        "tokenizer.json": _json_bytes({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}),
        "tokenizer_config.json": _json_bytes({"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 40960}),
    }
    weight_map, total = {}, 0
    for i in range(1, n_files + 1):
        name = f"model-{i:05d}-of-{n_files:05d}.safetensors"
        half = max(1, size // 2 - 64)
        tensors = {f"model.layers.{2 * i - 2}.weight": pseudo_random_bytes(half, (seed, name, 0)),
                   f"model.layers.{2 * i - 1}.weight": pseudo_random_bytes(half, (seed, name, 1))}
        files[name] = _safetensors_file(tensors)
        for tensor, data in tensors.items():
            weight_map[tensor] = name
            total += len(data)
    files["model.safetensors.index.json"] = _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"revision": revision or commit_sha_for(files), "files": files}


def _gguf_header(kv: dict) -> bytes:
    """A GGUF v3 header with no tensors and the given metadata (str, int as uint32, or (type, value))."""
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(kv))]
    for key, value in kv.items():
        k = key.encode()
        out.append(struct.pack("<Q", len(k)) + k)
        if isinstance(value, str):
            v = value.encode()
            out.append(struct.pack("<IQ", 8, len(v)) + v)
        elif isinstance(value, tuple):  # (gguf type id, struct format, value)
            type_id, fmt, val = value
            out.append(struct.pack("<I", type_id) + struct.pack("<" + fmt, val))
        else:
            out.append(struct.pack("<II", 4, value))
    return b"".join(out)


GGUF_FILE_TYPES = {"Q8_0": 7, "Q4_K_M": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


def _gguf_file(name: str, quant: str, size: int, seed: object, split: tuple[int, int] | None = None) -> bytes:
    kv = {"general.architecture": "qwen3", "general.name": name,
          "general.file_type": GGUF_FILE_TYPES[quant]}
    if split:
        kv["split.no"] = (2, "H", split[0] - 1)  # uint16, zero-based like llama.cpp's gguf-split
        kv["split.count"] = (2, "H", split[1])
        kv["split.tensors.count"] = (5, "i", 0)
    header = _gguf_header(kv)
    return header + pseudo_random_bytes(max(0, size - len(header)), seed)


def make_gguf_repo(name: str = "Qwen3-1.7B", size: int = 64 * 1024, *, seed: object = 0,
                   revision: str | None = None) -> dict:
    """A GGUF repo as quantizers publish them: a single-file Q8_0 quant at the top level and a
    Q4_K_M quant split in two shards in a Q4_K_M/ subfolder, plus .gitattributes, README.md and
    config.json. Each .gguf starts with a parseable GGUF v3 header (split.no/split.count for the
    shards), followed by `size`-ish bytes of filler."""
    files: dict[str, bytes] = {
        ".gitattributes": GITATTRIBUTES,
        "README.md": f"---\nbase_model: Qwen/{name}\ntags: [gguf]\n---\n# {name}-GGUF\n".encode(),
        "config.json": _json_bytes(QWEN3_CONFIG),
        f"{name}-Q8_0.gguf": _gguf_file(name, "Q8_0", size, (seed, "Q8_0")),
    }
    for i in (1, 2):
        path = f"Q4_K_M/{name}-Q4_K_M-{i:05d}-of-00002.gguf"
        files[path] = _gguf_file(name, "Q4_K_M", size // 2, (seed, path), split=(i, 2))
    return {"revision": revision or commit_sha_for(files), "files": files}
