"""Prometheus /metrics of the stand-in engines, in the real engines' names and types.

Counters move as the server serves: every completion adds its prompt tokens at once and its
generated tokens one by one (faults/engine_slow_generate: seconds per generated token, so a
request stays running for a while). faults/engine_stall=N freezes the engine the way a hung NCCL
collective does: N requests wait, generation stops, yet the API server still answers /metrics.

Sources of the names, types and labels:
    vLLM     https://docs.vllm.ai/en/stable/usage/metrics/ (labels engine, model_name)
    SGLang   https://docs.sglang.io/references/production_metrics.html (label model_name;
             only with --enable-metrics, else /metrics is not routed: 404)
    llama.cpp tools/server/README.md "GET /metrics" (no labels; only with --metrics, else
             501 "This server does not support metrics endpoint.")
"""
import os
import threading
import time

from .common import STATE, fault, gpu_total_mib

# (figure, name, type, help) per engine; figure is what the Meter counts.
VLLM = [
    ("running", "vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("waiting", "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("kv_cache", "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("prompt", "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("generation", "vllm:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("latency", "vllm:e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds."),
]
SGLANG = [
    ("prompt", "sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("generation", "sglang:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("kv_cache", "sglang:token_usage", "gauge", "The token usage"),
    ("running", "sglang:num_running_reqs", "gauge", "The number of running requests"),
    ("waiting", "sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue"),
    ("latency", "sglang:e2e_request_latency_seconds", "histogram",
     "Histogram of End-to-end request latency in seconds"),
]
LLAMACPP = [
    ("prompt", "llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed."),
    ("generation", "llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed."),
    ("kv_cache", "llamacpp:kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("running", "llamacpp:requests_processing", "gauge", "Number of requests processing."),
    ("waiting", "llamacpp:requests_deferred", "gauge", "Number of requests deferred."),
]
KV_TOKENS = 32768  # the stand-in's KV cache size, for kv_cache usage
LATENCY_BUCKETS = (1.0, 10.0, 60.0)
STALL_LIMIT_S = 600


def number(value, integers):
    """prometheus_client prints floats (5.0, 8.128902e+06); llama.cpp prints integers."""
    return str(int(value)) if integers else repr(float(value))


class Meter:
    """Request and token counts of one server."""

    def __init__(self, spec, labels=""):
        self.spec, self.labels = spec, labels
        self.lock = threading.Lock()
        self.running = self.prompt = self.generation = 0
        self.latencies = []

    def serve(self, prompt_tokens, generated_tokens):
        """Account one completion while it runs; returns when it is done."""
        started = time.monotonic()
        with self.lock:
            self.running += 1
            self.prompt += prompt_tokens
        try:
            step = float(fault("engine_slow_generate") or 0)
            for _ in range(generated_tokens):
                wait_while_stalled()
                time.sleep(step)
                with self.lock:
                    self.generation += 1
        finally:
            with self.lock:
                self.running -= 1
                self.latencies.append(time.monotonic() - started)

    def figures(self):
        stalled = fault("engine_stall")
        with self.lock:
            waiting = int(stalled or 1) if stalled is not None else 0
            return {"running": self.running, "waiting": waiting, "prompt": self.prompt,
                    "generation": self.generation,
                    "kv_cache": min(1.0, self.running * 512 / KV_TOKENS), "latency": list(self.latencies)}

    def render(self):
        figures, integers = self.figures(), self.spec is LLAMACPP
        lines = []
        for figure, name, kind, text in self.spec:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                values = figures[figure]
                for bound in LATENCY_BUCKETS:
                    count = sum(v <= bound for v in values)
                    lines.append(f'{name}_bucket{{le="{bound}",{self.labels}}} {number(count, integers)}')
                lines.append(f'{name}_bucket{{le="+Inf",{self.labels}}} {number(len(values), integers)}')
                lines.append(f"{name}_count{{{self.labels}}} {number(len(values), integers)}")
                lines.append(f"{name}_sum{{{self.labels}}} {number(sum(values), integers)}")
                continue
            braces = f"{{{self.labels}}}" if self.labels else ""
            lines.append(f"{name}{braces} {number(figures[figure], integers)}")
        return "\n".join(lines) + "\n"


def wait_while_stalled():
    """The hang: nothing moves while faults/engine_stall exists (bounded)."""
    for _ in range(STALL_LIMIT_S * 10):
        if fault("engine_stall") is None:
            return
        time.sleep(0.1)


def hold_gpu_memory(fraction, process_name):
    """Register this process as holding `fraction` of the GPU's memory, for the stand-in
    nvidia-smi (which lists the live holders, as `--query-compute-apps` does on a real host)."""
    total = gpu_total_mib()
    folder = STATE / "gpu_processes"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).write_text(f"{int(total * float(fraction))} {process_name}\n")
