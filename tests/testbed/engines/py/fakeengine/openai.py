"""A minimal OpenAI-compatible HTTP server (threaded, stdlib only)."""
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .common import die, fault, log


class Served:
    """What the server reports: model id and engine details."""

    def __init__(self, engine, model_id, root=None, max_len=32768, meter=None,
                 no_metrics=(404, {"detail": "Not Found"}), api_key=None):
        self.engine, self.model_id, self.root, self.max_len = engine, model_id, root, max_len
        self.api_key = api_key
        self.generate = fault("no_generate") is None
        self.meter = meter  # None: /metrics answers no_metrics (code, body), as the engine does
        self.no_metrics = no_metrics
        self.loading = None  # (code, body) every request gets while the model loads

    def models(self):
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": int(time.time()),
            "owned_by": self.engine, "root": self.root or self.model_id,
            "max_model_len": self.max_len}]}

    def completion(self, request, chat):
        text = f"Hello from {self.engine}."
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        if self.meter:
            self.meter.serve(usage["prompt_tokens"], usage["completion_tokens"])
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "stop"} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": request.get("model", self.model_id),
                "choices": [choice], "usage": usage}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    sys_version = ""

    def log_message(self, fmt, *args):
        log(f'INFO:     {self.client_address[0]}:{self.client_address[1]} - "{self.requestline}" '
            f"{args[1] if len(args) > 1 else ''}")

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refused(self, path):
        """With an API key, /v1 routes answer 401 unless the request carries
        `Authorization: Bearer KEY` (vllm/entrypoints/openai/api_server.py's middleware;
        llama-server and SGLang check the same header)."""
        key = self.server.served.api_key
        if not key or not path.startswith("/v1") or self.headers.get("Authorization") == f"Bearer {key}":
            return False
        self.send_json(401, {"error": "Unauthorized"})
        return True

    def do_GET(self):
        served = self.server.served
        path = self.path.split("?")[0]
        if served.loading:
            self.send_json(*served.loading)
        elif self.refused(path):
            return
        elif path in ("/health", "/health_generate", "/ping"):
            self.send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self.send_json(200, served.models())
        elif path == "/metrics":
            self.send_metrics(served)
        elif path in ("/version", "/get_model_info", "/props"):
            self.send_json(200, {"version": "fake", "model_path": served.root or served.model_id})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def send_metrics(self, served):
        if not served.meter:
            return self.send_json(*served.no_metrics)
        data = served.meter.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        served = self.server.served
        if served.loading:
            return self.send_json(*served.loading)
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.send_json(400, {"error": {"message": "invalid JSON", "code": 400}})
        path = self.path.split("?")[0]
        if self.refused(path):
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self.send_json(404, {"detail": "Not Found"})
        if request.get("model") not in (None, served.model_id):
            return self.send_json(404, {"error": {
                "message": f"The model `{request.get('model')}` does not exist.",
                "type": "NotFoundError", "code": 404}})
        if not served.generate:
            return self.send_json(500, {"error": {"message": "Internal server error",
                                                  "type": "InternalServerError", "code": 500}})
        body = served.completion(request, chat=path.endswith("chat/completions"))
        if request.get("stream"):
            return self.send_stream(body)
        self.send_json(200, body)

    def send_stream(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for choice in body["choices"]:
            if "message" in choice:
                choice["delta"] = choice.pop("message")
        self.wfile.write(f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode())
        self.close_connection = True


def serve(served, addr, port, ready_lines, load=None, loading=None):
    """Bind, print the engine's ready lines, and serve until killed. With load, the server
    answers `loading` (code, body) to every request until load() returns (llama-server)."""
    try:
        server = ThreadingHTTPServer((addr, port), Handler)
    except OSError as exc:
        die(f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address "
            f"('{addr}', {port}): {exc.strerror.lower()}")
    server.daemon_threads = True
    server.served = served
    if load:
        served.loading = loading
        threading.Thread(target=server.serve_forever, daemon=True).start()
        load()
        served.loading = None
        for line in ready_lines:
            log(line)
        threading.Event().wait()
    for line in ready_lines:
        log(line)
    server.serve_forever()
