"""status: each workload's health end to end on the bed (ready, busy, stalled, failed, starting),
the hosts' figures, --check, --watch as JSON lines, plain blocks and the live view in a
pseudo-terminal; the probe's parsers on raw tool output."""

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import sparkrun as sr
from conftest import H1, H2, REPO, read_until
from test_lifecycle import lab, run_ok  # noqa: F401 (lab is a fixture)

VLLM_METRICS_DOC = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:generation_tokens_total{engine="0",model_name="m"} 7.557572e+06
vllm:e2e_request_latency_seconds_bucket{le="1.0",engine="0",model_name="m"} 3.0
"""


def status_json(lab, *args, hosts=(H1,)):
    result = lab("status", "-H", ",".join(hosts), "--json", *args)
    assert result.returncode in (0, sr.UNHEALTHY_EXIT), result.stderr
    return json.loads(result.stdout)


def only_workload(status):
    (workload,) = status["workloads"]
    return workload


def complete(host, port=8000, max_tokens=4):
    body = json.dumps({"model": "qwen3-1.7b", "prompt": "Hi", "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("recipe", ["qwen3-1.7b-vllm", "qwen3-1.7b-sglang", "qwen3-1.7b-llama-cpp"])
def test_ready_with_engine_and_host_figures(lab, recipe):
    run_ok(lab, recipe, "-H", H1)
    status = status_json(lab)
    workload = only_workload(status)
    assert (workload["health"], workload["reason"], workload["ready"]) == ("ready", "", True)
    # The engine's own /metrics answered (SGLang and llama-server only with the flags runs add).
    assert (workload["requests_running"], workload["requests_waiting"], workload["kv_cache_usage"]) == (0, 0, 0.0)
    assert 0 <= workload["uptime_s"] < 120
    (host,) = status["hosts"]
    # A DGX Spark's nvidia-smi has no memory.used ([N/A]): the in-use figure is its processes'.
    assert host["gpu"] == "NVIDIA GB10, [N/A]" and len(host["gpu_processes"]) == 1
    assert host["gpu_memory_used_mib"] == host["gpu_processes"][0]["used_mib"] > 0
    assert (host["gpu_utilization"], host["gpu_temperature_c"], host["gpu_power_w"]) == (0.0, 38.0, 4.5)
    assert host["mem_available_mib"] > 0
    text = lab("status", "-H", H1, check=0).stdout
    assert f"{recipe} (" in text and "  ready; up " in text and "requests 0 running, 0 waiting" in text
    assert "GPU MEMORY USED" in text and "(1 proc)" in text


def test_busy_with_token_rates_over_the_last_interval(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    lab.bed.hosts[0].fault("engine_slow_generate", 0.1)  # a request runs 0.4 s, a token every 0.1 s
    stop = threading.Event()

    def keep_busy():
        for _ in range(200):
            if stop.is_set():
                return
            complete(H1)

    senders = [threading.Thread(target=keep_busy, daemon=True) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        result = lab("status", "-H", H1, "--watch", "0.5", "--count", "3", "--json", check=0)
    finally:
        stop.set()
        for sender in senders:
            sender.join(30)
    refreshes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(refreshes) == 3
    last = only_workload(refreshes[-1])
    assert last["health"] == "busy" and last["requests_running"] >= 1
    assert 0.4 < last["interval_s"] < 5 and last["generation_tokens_per_s"] > 0 and last["prompt_tokens_per_s"] > 0
    assert last["kv_cache_usage"] > 0


def test_stalled_when_requests_wait_and_no_token_moves(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    lab.bed.hosts[0].fault("engine_stall", 2)  # the NCCL hang: 2 waiting, generation frozen
    first = only_workload(status_json(lab, "--stall-after", "1"))
    assert first["health"] == "busy" and first["requests_waiting"] == 2
    time.sleep(1.2)
    second = only_workload(status_json(lab, "--stall-after", "1"))
    assert second["health"] == "stalled"
    assert second["reason"].startswith("0 running, 2 waiting, and no token generated for ")
    check = lab("status", "-H", H1, "--check", "--stall-after", "1")
    assert check.returncode == sr.UNHEALTHY_EXIT
    assert f"Unhealthy: qwen3-1.7b-vllm at http://{H1}:8000/v1 is stalled: 0 running, 2 waiting" in check.stderr
    lab.bed.hosts[0].fault("engine_stall", None)
    assert lab("status", "-H", H1, "--check", "--stall-after", "1").returncode == 0


def test_failed_worker_with_its_last_log_lines(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2")
    assert only_workload(status_json(lab, hosts=(H1, H2)))["health"] == "ready"
    worker_only = only_workload(status_json(lab, hosts=(H2,)))
    assert worker_only["health"] == "unknown"
    assert worker_only["reason"] == f"its head ({H1}) is not among the hosts asked"
    lab.bed.hosts[1].fault("engine_crash")
    deadline = time.monotonic() + 10
    while any(c["running"] for c in lab.bed.hosts[1].containers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    workload = only_workload(status_json(lab, hosts=(H1, H2)))
    assert workload["health"] == "failed" and workload["ready"] is False
    assert workload["reason"] == f"container {workload['cluster_id']}_worker1 on {H2} is exited (exit code 1)"
    assert "ERROR: engine core died unexpectedly (engine_crash fault)" in workload["last_log_lines"]
    check = lab("status", "-H", f"{H1},{H2}", "--check")
    assert check.returncode == sr.UNHEALTHY_EXIT and "is failed: container " in check.stderr
    assert "    | ERROR: engine core died unexpectedly" in check.stdout


@pytest.mark.parametrize("recipe, reason", [
    ("qwen3-1.7b-sglang", "not answering on port 8000 yet"),  # SGLang listens once loaded
    ("qwen3-1.7b-llama-cpp", "loading (HTTP 503)"),  # llama-server listens at once, 503 while loading
])
def test_starting_while_the_server_loads(lab, recipe, reason):
    lab.bed.hosts[0].fault("engine_slow_ready", 60)
    launch = subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), "run", recipe, "-H", H1,
                               "--no-sync", "--no-follow"], env=lab.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        workloads = []
        for _ in range(100):
            workloads = status_json(lab)["workloads"]
            if workloads and workloads[0]["reason"] == reason:
                break
            time.sleep(0.2)
        (workload,) = workloads
        assert (workload["health"], workload["reason"]) == ("starting", reason)
        assert lab("status", "-H", H1, "--check").returncode == sr.UNHEALTHY_EXIT
    finally:
        launch.send_signal(signal.SIGINT)  # run removes what it started
        launch.wait(60)


def test_watch_without_a_terminal_prints_plain_blocks_over_one_connection_per_host(lab):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    lab.bed.close_client_masters()
    for host in lab.bed.hosts[:2]:
        host.reset_connections()
    result = lab("status", "-H", f"{H1},{H2}", "--watch", "0.2", "--count", "3", check=0)
    blocks = result.stdout.split("sparkrun status at ")
    assert len(blocks) == 4 and all("qwen3-1.7b-vllm (vllm-distributed)" in b for b in blocks[1:])
    assert "\033[" not in result.stdout
    assert [h.connection_count() for h in lab.bed.hosts[:2]] == [1, 1]  # every refresh rides the master


def test_check_and_watch_are_refused_together(cli):
    result = cli("status", "-H", H1, "--check", "--watch")
    assert result.returncode == 2 and "--check needs one probed status" in result.stderr


def exit_code_within(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def test_no_color_on_a_terminal_prints_plain_blocks(lab):
    env = dict(lab.env, TERM="xterm", NO_COLOR="1")
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execve(sys.executable, [sys.executable, str(REPO / "sparkrun.py"), "status", "-H", H1,
                                       "--watch", "0.2", "--count", "2"], env)
        finally:
            os._exit(127)
    code = None
    try:
        shown = read_until(fd, b"never shown", 30)  # until it exits and the terminal closes
        code = exit_code_within(pid, 10)
    finally:
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert code == 0 and shown.count(b"sparkrun status at ") == 2 and b"\x1b[" not in shown


@pytest.mark.parametrize("quit_key", [b"q", b"\x03"])
def test_live_view_in_a_terminal_refreshes_in_place_and_quits(lab, quit_key):
    run_ok(lab, "qwen3-1.7b-vllm", "-H", H1)
    env = {k: v for k, v in lab.env.items() if k != "NO_COLOR"}
    env.update(TERM="xterm", LINES="40", COLUMNS="160")
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execve(sys.executable, [sys.executable, str(REPO / "sparkrun.py"), "status", "-H", H1,
                                       "--watch", "0.3"], env)
        finally:
            os._exit(127)
    code = None
    try:
        screen = read_until(fd, b"requests 0 running", 30)
        assert b"\x1b[?1049h" in screen  # curses took the alternate screen: drawn in place
        assert b"qwen3-1.7b-vllm" in screen and b"ready" in screen
        assert read_until(fd, b"never shown", 1.5)  # later refreshes redraw what changed
        os.write(fd, quit_key)  # q, or Ctrl+C (the terminal sends SIGINT)
        assert b"\x1b[?1049l" in read_until(fd, b"\x1b[?1049l", 10)  # the screen is given back
        code = exit_code_within(pid, 10)
        assert code == 0
    finally:
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


# -- the probe's raw output and the health rules, without hosts ------------------------------

def test_monitor_sections_parse_raw_tool_output():
    output = "\n".join([
        "@@hostname", "spark1", "@@clock", "1764323513,25",
        "@@meminfo", "103547188",
        "@@gpu_load", "[N/A], 96, 61, 87.35",
        "@@gpu_processes", "4242, 110315", "4243, [N/A]",
        "@@engines",
        "container|sparkrun_x_head|running|0|0|2026-11-28T09:51:53.123456789Z",
        "metric|sparkrun_x_head|HTTP/1.1 200 OK",
        'metric|sparkrun_x_head|vllm:num_requests_running{engine="0"} 1.0',
        "container|sparkrun_x_worker1|exited|137|0|2026-11-28T09:51:54Z",
        "log|sparkrun_x_worker1|NCCL WARN | timeout",
        "@@end"])
    facts = sr.parse_probe("spark1", output)
    assert facts.clock == 1764323513.25 and facts.mem_available_mib == 101120
    assert [g.as_dict() for g in facts.gpu_load] == [{"memory_used_mib": None, "utilization": 96.0,
                                                      "temperature": 61.0, "power": 87.35}]
    assert facts.gpu_processes == ((4242, 110315.0),) and sr.gpu_memory_used_mib(facts) == 110315.0
    head, worker = facts.engines["sparkrun_x_head"], facts.engines["sparkrun_x_worker1"]
    assert (head.state, head.http_status) == ("running", 200)
    assert head.metrics == ['vllm:num_requests_running{engine="0"} 1.0']
    assert (worker.state, worker.exit_code, worker.logs) == ("exited", "137", ["NCCL WARN | timeout"])
    assert sr.rfc3339_epoch(head.started) == 1795859513.0 and sr.rfc3339_epoch("0001-01-01T00:00:00Z") is None


def test_engine_figures_by_the_runtimes_metric_names():
    vllm = sr.engine_figures(VLLM_METRICS_DOC.splitlines(), sr.load_runtime("vllm-ray").METRICS)
    # Engines add up; the KV cache is the fullest; a renamed metric is found by its older name.
    assert vllm == {"running": 3.0, "waiting": 0.0, "generation_tokens": 7557572.0, "kv_cache": 0.5}
    llama = sr.engine_figures(["llamacpp:requests_deferred 2", "llamacpp:tokens_predicted_total 3469"],
                              sr.load_runtime("llama-cpp").METRICS)
    assert llama == {"waiting": 2.0, "generation_tokens": 3469.0}
    assert set(sr.runtime_metric_names()) >= {"sglang:num_queue_reqs", "llamacpp:kv_cache_usage_ratio",
                                              "vllm:gpu_cache_usage_perc"}


def health_of(samples, clock, running, generated, stall_after=60.0):
    workload = {}
    figures = {"running": running, "waiting": 0, "generation_tokens": generated, "prompt_tokens": 10}
    sr.assess_engine(workload, figures, samples, "launch@start", clock, stall_after)
    return workload


def test_stall_clock_starts_with_requests_and_rates_skip_counter_resets():
    samples = {}
    assert health_of(samples, 1000.0, 0, 50)["health"] == "ready"
    assert health_of(samples, 1500.0, 1, 50)["health"] == "busy"  # idle until now: no stall yet
    assert health_of(samples, 1559.0, 1, 50)["health"] == "busy"
    stalled = health_of(samples, 1560.0, 1, 50)
    assert stalled["health"] == "stalled" and stalled["generation_tokens_per_s"] == 0.0
    moving = health_of(samples, 1562.0, 1, 70)
    assert moving["health"] == "busy" and moving["generation_tokens_per_s"] == 10.0 and moving["interval_s"] == 2.0
    restarted = health_of(samples, 1564.0, 1, 3)  # a new engine counts from 0: no rate
    assert restarted["health"] == "busy" and "generation_tokens_per_s" not in restarted
