"""sparkrun benchmark and sparkrun tune: occasional commands, imported only when one of them runs.

benchmark launches a recipe as `run` does, runs a benchmark framework from this machine against the
endpoint and writes the results; tune runs an engine's fused-MoE kernel tuning on one host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from sparkrun import (
    COMMAND_HELP,
    CONTAINER_HF_HOME,
    ContainerSpec,
    DOCKER_HELP,
    HOME_PREFIX,
    HostError,
    HostSelection,
    LaunchPlan,
    ModelSnapshot,
    Recipe,
    Record,
    RemoteFailed,
    SECRET_VALUES,
    SSH,
    SparkrunError,
    TUNING_ENGINES,
    TuningEngine,
    UsageError,
    __version__,
    atomic_write,
    cache_dir,
    cached_snapshot_dir,
    change_tuning_manifest,
    check_cli_value,
    coerce_value,
    detach_message,
    distribute_image,
    enabled_registries,
    find_benchmark_profile,
    find_recipe,
    find_workloads,
    format_value,
    hf_home,
    hub_offline,
    label_map,
    launch,
    local_snapshot,
    parse_overrides,
    print_table,
    probe_hosts,
    probe_ready,
    read_cached_config,
    recipe_values,
    remote_cache_root,
    remove_containers,
    resource_dir,
    run_threads,
    say,
    select_hosts,
    start_container,
    sync_snapshot,
    tuned_sizes,
    tuning_dir,
    tuning_engine_of,
    typed_overrides,
    update_registries,
    warn,
)


# benchmark: launch the recipe as `run` does (sparkrun's launch), run a benchmark framework on
# this machine against the endpoint, write one YAML with what is needed to reproduce the numbers,
# stop. A framework is a small class (llama-benchy is built in; more come from the
# `sparkrun.benchmarking` entry points). Air-gapped by design: the tokenizer comes from the local
# Hugging Face cache and the prompt text from a file served on 127.0.0.1.
# tune: run an engine's fused-MoE Triton tuning script per TP size in a tuning container on one
# host and copy the configs back to cache_dir()/tuning/<engine>; later launches of that engine
# sync the folder to their hosts, mount it and point the engine at it (tuning_mount).

BENCHMARK_TIMEOUT = 14400  # seconds, for the whole benchmark
BENCHMARK_FRAMEWORK = "llama-benchy"
BENCHMARK_ENTRY_POINTS = "sparkrun.benchmarking"
PROMPT_FILE = "benchmark-prompt.txt"  # bundled with the recipes (public text written for sparkrun)
SCHEDULE_KEYS = ("depth", "concurrency")
BENCHMARK_STOP_GRACE = 60  # seconds a framework gets to save partial results after Ctrl+C
# Benchmark args sparkrun decides itself; a profile or -o cannot set them.
RESERVED_BENCH_ARGS = {"base_url", "model", "served_model_name", "save_result", "format", "framework"}

LLAMA_BENCHY_MISSING = ("llama-benchy is not installed on this machine; install it with "
                        "'python3 -m pip install llama-benchy' (or 'pipx install llama-benchy')")
TOKENIZER_MISSING = ("no tokenizer for {name} in the local Hugging Face cache ({home}/hub) and the Hub "
                     "cannot be reached; put the model's tokenizer.json there, or pass -o tokenizer=PATH "
                     "(a folder with tokenizer.json, or the file)")
NOT_RUNNING = "no running {recipe} on {hosts}; drop --skip-run to launch it"
BENCHMARK_INTERRUPTED = "Interrupted: partial results saved to {path}"


class BenchmarkFramework:
    """A benchmark tool run on this machine. Subclass it in a plugin (entry point group
    `sparkrun.benchmarking`, name = the framework's name) and override what differs."""

    name = ""
    defaults: dict = {}  # lowest-priority args
    aliases: dict = {}  # other spellings of an arg -> its name
    install_hint = ""  # the error when available() is false

    def available(self) -> bool:
        return True

    def argv(self, job: BenchmarkJob) -> list[str]:
        raise NotImplementedError

    def env(self, job: BenchmarkJob) -> dict:
        """Extra environment for the framework process."""
        return {}

    def rows(self, raw) -> list[dict]:
        """Table rows from the framework's JSON: depth, concurrency, pp, tg, pp_tps, tg_tps, ttfr_ms."""
        return []

    def cleanup(self, job: BenchmarkJob) -> None:
        """Remove what the framework left behind for this job (caches of served files)."""

    def version(self) -> str:
        return ""


class BenchmarkJob(Record):
    """One run of a framework: everything it needs, decided before it starts."""
    endpoint: str  # http://head:port/v1
    model: str  # Hugging Face id, ':QUANT' stripped
    served_model: str  # the name the server answers to
    args: dict  # framework args, schedule point applied
    tokenizer: str | None  # a local folder or file, or a Hub id when the Hub is reachable
    prompt_url: str | None  # where the framework reads its prompt text
    result_file: Path  # where the framework writes its JSON
    offline: bool  # nothing may be fetched from the Hub


def bench_flag(name: str, value) -> list[str]:
    """One arg as command-line words: lists repeat values, true is a bare flag, false is nothing,
    a mapping becomes repeated key=value (JSON values)."""
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, (list, tuple)):
        return [flag, *map(format_value, value)] if value else []
    if isinstance(value, dict):
        return [word for key, item in value.items() for word in (flag, f"{key}={json.dumps(item)}")]
    return [flag, format_value(value)]


class LlamaBenchy(BenchmarkFramework):
    name = "llama-benchy"
    defaults = {"pp": [2048], "tg": [128], "depth": [0], "concurrency": [1], "runs": 3}
    aliases = {"prefix_caching": "enable_prefix_caching"}
    install_hint = LLAMA_BENCHY_MISSING
    negated = {"adapt_prompt"}  # on by default in llama-benchy: false becomes --no-adapt-prompt

    def command(self) -> list[str]:
        found = shutil.which("llama-benchy")
        return [found] if found else [sys.executable, "-m", "llama_benchy"]

    def available(self) -> bool:
        import importlib.util

        return bool(shutil.which("llama-benchy") or importlib.util.find_spec("llama_benchy"))

    def version(self) -> str:
        try:
            from importlib.metadata import version

            return version("llama-benchy")
        except Exception:  # installed some other way: not worth failing over
            return ""

    def argv(self, job: BenchmarkJob) -> list[str]:
        argv = [*self.command(), "--base-url", job.endpoint, "--model", job.model,
                "--served-model-name", job.served_model, "--format", "json", "--save-result", str(job.result_file)]
        if job.tokenizer:
            argv += ["--tokenizer", job.tokenizer]
        if job.prompt_url:
            argv += ["--book-url", job.prompt_url]
        for key, value in job.args.items():
            if key in ("tokenizer", "book_url"):
                continue
            if key in self.negated and value is False:
                argv.append("--no-" + key.replace("_", "-"))
            else:
                argv += bench_flag(key, value)
        return argv

    def env(self, job: BenchmarkJob) -> dict:
        return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if job.offline else {}

    def rows(self, raw) -> list[dict]:
        def mean(metric):
            return round(metric["mean"], 3) if isinstance(metric, dict) and metric.get("mean") is not None else None

        rows = []
        for run in (raw or {}).get("benchmarks") or []:
            rows.append({"depth": run.get("context_size"), "concurrency": run.get("concurrency"),
                         "pp": run.get("prompt_size"), "tg": run.get("response_size"),
                         "phase": "context" if run.get("is_context_prefill_phase") else "prompt",
                         "pp_tps": mean(run.get("pp_throughput")), "tg_tps": mean(run.get("tg_throughput")),
                         "peak_tg_tps": mean(run.get("peak_throughput")), "ttfr_ms": mean(run.get("ttfr")),
                         "est_ppt_ms": mean(run.get("est_ppt")), "e2e_ttft_ms": mean(run.get("e2e_ttft"))})
        return rows

    def cleanup(self, job: BenchmarkJob) -> None:
        # llama-benchy keeps every text it fetched in ~/.cache/llama-benchy/<md5 of the URL>.txt;
        # ours came from a one-off local address, so its copy is of no further use.
        if job.prompt_url and job.prompt_url.startswith("http://127.0.0.1:"):
            import hashlib

            digest = hashlib.md5(job.prompt_url.encode()).hexdigest()
            (Path.home() / ".cache" / "llama-benchy" / f"{digest}.txt").unlink(missing_ok=True)


BUILTIN_FRAMEWORKS = {LlamaBenchy.name: LlamaBenchy}


def load_framework(name: str) -> BenchmarkFramework:
    """A framework by name: built in, or from the `sparkrun.benchmarking` entry points."""
    if name in BUILTIN_FRAMEWORKS:
        return BUILTIN_FRAMEWORKS[name]()
    from importlib.metadata import entry_points

    for entry in entry_points(group=BENCHMARK_ENTRY_POINTS):
        if entry.name == name:
            loaded = entry.load()
            return loaded() if isinstance(loaded, type) else loaded
    known = sorted(set(BUILTIN_FRAMEWORKS) | {e.name for e in entry_points(group=BENCHMARK_ENTRY_POINTS)})
    raise UsageError(f"unknown benchmark framework '{name}' (known: {', '.join(known)})")


class BenchmarkProfile(Record):
    name: str  # for the output file name: the profile's file stem, or "default"
    path: str | None
    framework: str | None
    args: dict
    schedule: tuple = ()  # ({"depth": d, "concurrency": c}, ...) in order
    timeout: float | None = None
    description: str = ""


BENCHMARK_SETTINGS = ("framework", "args", "schedule", "timeout")  # of a profile or a recipe's block
PROFILE_EMPTY = "{path}: no benchmark settings: a profile needs framework, args, schedule or timeout"


def read_profile(name: str | None) -> BenchmarkProfile:
    """A profile (file, name or @registry/name) in either layout: `framework`/`args`/`schedule`/
    `timeout` at the top, or nested under `benchmark:` as older profiles have it (there, args may
    also sit directly under `benchmark:`)."""
    if not name:
        return BenchmarkProfile("default", None, None, {})
    path, data = find_benchmark_profile(name)
    nested = data.get("benchmark") if isinstance(data.get("benchmark"), dict) else None
    body = {**{k: data[k] for k in BENCHMARK_SETTINGS if k in data}, **(nested or {})}
    profile = benchmark_settings(body, path, flat_args=nested is not None)
    if profile.framework is None and not profile.args and not profile.schedule and profile.timeout is None:
        raise UsageError(PROFILE_EMPTY.format(path=path))
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return profile.replace(name=path.stem, description=str(metadata.get("description", "")))


def benchmark_settings(body: dict, path, *, flat_args: bool) -> BenchmarkProfile:
    """`framework`, `args`, `schedule` and `timeout` of a profile or a recipe's `benchmark:` block;
    with flat_args, the block's other keys are args too (`args:` wins over them)."""
    args = body.get("args") if body.get("args") is not None else {}
    if not isinstance(args, dict):
        raise UsageError(f"{path}: 'args' must be a mapping of benchmark args")
    if flat_args:
        args = {**{k: v for k, v in body.items() if k not in BENCHMARK_SETTINGS + ("metadata",)}, **args}
    schedule = body.get("schedule") or []
    if not isinstance(schedule, list) or not all(isinstance(p, dict) and set(p) <= set(SCHEDULE_KEYS)
                                                 and p for p in schedule):
        raise UsageError(f"{path}: 'schedule' must be a list of {{depth, concurrency}} points")
    timeout = body.get("timeout")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise UsageError(f"{path}: 'timeout' must be a number of seconds")
    return BenchmarkProfile(Path(path).stem, str(path), body.get("framework"), dict(args), tuple(schedule), timeout)


def recipe_benchmark_block(recipe: Recipe) -> BenchmarkProfile:
    """A recipe's `benchmark:` block, read as a profile: flat keys or an `args:` mapping, plus
    `framework`, `schedule` and `timeout`."""
    return benchmark_settings(recipe.benchmark, recipe.path, flat_args=True)


def bench_overrides(pairs: list[str]) -> dict:
    """-o key=value for benchmark args; a comma makes a list (-o depth=0,4096)."""
    values = {}
    for key, value in parse_overrides(pairs).items():
        if isinstance(value, str) and "," in value:
            value = [coerce_value(v.strip()) for v in value.split(",") if v.strip()]
        values[key] = value
    return values


def merge_bench_args(framework: BenchmarkFramework, *layers: dict) -> dict:
    """Lowest to highest: framework defaults, recipe block, profile args, -o."""
    merged: dict = {}
    for layer in (framework.defaults, *layers):
        for key, value in (layer or {}).items():
            key = framework.aliases.get(key, key)
            if key in RESERVED_BENCH_ARGS:
                warn(f"benchmark arg '{key}' is set by sparkrun; ignored")
                continue
            merged[key] = value
    return merged


def schedule_points(args: dict, schedule: tuple) -> list[dict]:
    """One args mapping per framework run: all of args at once, or one per schedule point."""
    if not schedule:
        return [dict(args)]
    return [dict(args, **{k: [v] for k, v in point.items()}) for point in schedule]


def resolve_tokenizer(name: str, home: Path) -> tuple[str, bool]:
    """(what to pass as --tokenizer, offline?): a local path, the cached snapshot that holds
    tokenizer.json, or the Hub id when the Hub is reachable."""
    local = Path(os.path.expanduser(name))
    if local.exists():
        return str(local.resolve()), True
    snapshot = cached_snapshot_dir(home, name.partition(":")[0])
    if snapshot and (snapshot / "tokenizer.json").is_file():
        return str(snapshot), True
    if hub_offline():
        raise SparkrunError(TOKENIZER_MISSING.format(name=name, home=home))
    return name, False


class PromptServer:
    """Serves the bundled prompt text on 127.0.0.1 (an ephemeral port) while a benchmark runs."""

    path = "/sparkrun-benchmark-prompt.txt"

    def __init__(self, text_file: Path):
        self.data = text_file.read_bytes()

    def __enter__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        data, served_path = self.data, self.path

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                found = self.path.split("?")[0] == served_path
                body = data if found else b"not found\n"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def prompt_text_file() -> Path:
    return resource_dir("recipes") / PROMPT_FILE


class BenchTarget(Record):
    """The server a benchmark measures: launched now, or found running by its labels."""
    endpoint: str
    served_model: str
    runtime: str
    cluster_id: str
    hosts: tuple
    image: str
    containers: dict  # host -> [container names], the head's host first and its head container first
    launched: bool

    @property
    def head_host(self) -> str:
        return next(iter(self.containers))

    @property
    def head_container(self) -> str:
        return self.containers[self.head_host][0]


def target_from_plan(plan: LaunchPlan) -> BenchTarget:
    names: dict = {}
    for spec in sorted(plan.containers, key=lambda c: c.role != "head"):  # stable: host order kept
        names.setdefault(spec.host, []).append(spec.name)
    return BenchTarget(plan.endpoint, plan.served_model, plan.runtime, plan.cluster_id, plan.hosts,
                       plan.containers[0].image, names, True)


def running_target(ssh: SSH, recipe: Recipe, selection: HostSelection, port: int | None) -> BenchTarget:
    """The launch of `recipe` already running on the selected hosts (found by its labels)."""
    found = find_workloads(ssh, selection.hosts, recipe=(recipe.name,), port=port, role="head")
    heads = [(h, c) for h, cs in found.items() for c in cs if c.get("State", "running") == "running"]
    if not heads:
        raise SparkrunError(NOT_RUNNING.format(recipe=recipe.name, hosts=", ".join(selection.hosts)))
    host, container = heads[0]
    labels = label_map(container)
    head = labels.get("sparkrun.head", host)
    address = head.rpartition("@")[2]
    address = f"[{address}]" if ":" in address else address
    endpoint = f"http://{address}:{labels.get('sparkrun.port', '8000')}/v1"
    served = labels.get("sparkrun.served_model", recipe.model_repo)
    hosts = tuple(h for h in labels.get("sparkrun.hosts", host).split(",") if h) or (host,)
    why = probe_ready(endpoint, served, "models")
    if why:
        raise SparkrunError(f"{recipe.name} runs as {labels.get('sparkrun.cluster')} but {endpoint} is {why}")
    return BenchTarget(endpoint, served, labels.get("sparkrun.runtime", ""), labels.get("sparkrun.cluster", ""),
                       hosts, container.get("Image", ""), {host: [container["Names"]]}, False)


def container_image_id(ssh: SSH, host: str, container: str) -> str:
    try:
        result = ssh.run(host, f"docker inspect --format '{{{{.Image}}}}' {shlex.quote(container)}\n", timeout=30)
    except HostError:
        return ""
    return result.stdout.strip() if result.ok else ""


class FrameworkRun(Record, mutable=True):
    """What one framework run left: its args, exit code, JSON and rows."""
    args: dict
    exit_code: int | None = None
    raw: dict | None = None
    rows: list = []
    status: str = "complete"  # complete, failed, interrupted, timeout


class BenchmarkInterrupted(Exception):
    def __init__(self, run: FrameworkRun):
        super().__init__("interrupted")
        self.run = run


def run_framework(framework: BenchmarkFramework, job: BenchmarkJob, deadline: float) -> FrameworkRun:
    """Run the framework until it ends, the deadline passes (status timeout) or Ctrl+C (raises
    BenchmarkInterrupted with the partial results). It runs in a session of its own, so the one
    SIGINT it gets comes from us, and it has the time to save what it measured."""
    import signal

    env = dict(os.environ)
    env.update(framework.env(job))
    head = job.endpoint.split("//")[1].rsplit(":", 1)[0].strip("[]")
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost", head]))
    argv = framework.argv(job)
    say("$ " + shlex.join(argv))
    run = FrameworkRun(job.args)
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True)
    interrupted = False
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                run.status = "timeout"
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted, run.status = True, "interrupted"
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(BENCHMARK_STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    run.exit_code = process.returncode
    if run.status == "complete" and run.exit_code != 0:
        run.status = "failed"
    try:
        run.raw = json.loads(job.result_file.read_text())
    except (OSError, ValueError):
        run.raw = None
    run.rows = framework.rows(run.raw) if run.raw else []
    framework.cleanup(job)
    if interrupted:
        raise BenchmarkInterrupted(run)
    return run


def yaml_text(data) -> str:
    """YAML with multi-line strings (the recipe text) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)


def benchmark_record(recipe: Recipe, target: BenchTarget, image_id: str, tp: int, framework: BenchmarkFramework,
                     profile: BenchmarkProfile, args: dict, runs: list, home: Path, started: str,
                     timeout: float) -> dict:
    """Everything the results YAML holds: what ran, where, with which args, and what it measured."""
    import hashlib

    snapshot = cached_snapshot_dir(home, recipe.model_repo, recipe.model_revision)
    config = read_cached_config(home, recipe.model_repo, recipe.model_revision) or {}
    statuses = [r.status for r in runs]
    return {
        "sparkrun": __version__,
        "timestamp": started,
        "status": next((s for s in ("interrupted", "timeout", "failed") if s in statuses), "complete"),
        "recipe": {"name": recipe.name, "registry": recipe.source, "path": str(recipe.path),
                   "hash": "sha256:" + hashlib.sha256(recipe.text.encode()).hexdigest(), "text": recipe.text},
        "model": {"id": recipe.model, "revision": snapshot.name if snapshot else recipe.model_revision,
                  "dtype": recipe.metadata.get("model_dtype") or recipe.gguf_quant or config.get("torch_dtype")},
        "container": {"image": target.image, "image_id": image_id},
        "runtime": target.runtime,
        "hosts": list(target.hosts),
        "tp": tp,
        "endpoint": target.endpoint,
        "served_model": target.served_model,
        "framework": {"name": framework.name, "version": framework.version()},
        "profile": {"name": profile.name, "path": profile.path, "description": profile.description},
        "args": args,
        "schedule": [dict(p) for p in profile.schedule] or None,
        "timeout": timeout,
        "results": {
            "rows": [row for r in runs for row in r.rows],
            "runs": [{"args": r.args, "status": r.status, "exit_code": r.exit_code, "raw": r.raw} for r in runs],
        },
    }


def format_metric(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_benchmark_table(rows: list[dict]) -> None:
    if not rows:
        print("No results.")
        return
    table = [[str(r.get("depth", "")), str(r.get("concurrency", "")), str(r.get("pp", "")), str(r.get("tg", "")),
              format_metric(r.get("pp_tps")), format_metric(r.get("tg_tps")), format_metric(r.get("ttfr_ms"), 0),
              "context load" if r.get("phase") == "context" else ""] for r in rows]
    print_table(table, ["DEPTH", "CONC", "PP", "TG", "PP T/S", "TG T/S", "TTFR MS", "NOTE"])


def default_output_name(recipe: Recipe, profile: BenchmarkProfile, tp: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe.name)
    return f"benchmark_{safe}_{profile.name}_tp{tp}.yaml"


def benchmark_tp(recipe: Recipe, args) -> int:
    if args.solo or recipe.solo_only or recipe.mode == "solo":
        return 1
    values = recipe_values(recipe, typed_overrides(args))
    try:
        return max(1, int(values.get("tensor_parallel") or 1))
    except (TypeError, ValueError):
        return 1


def launch_namespace(args):
    """benchmark's options as launch() reads them: -o belongs to the benchmark, not the recipe."""
    return type(args)(**dict(vars(args), override=[], no_follow=True))


def cmd_benchmark(args) -> int:
    import tempfile

    recipe = find_recipe(args.recipe)
    selection = select_hosts(args)
    profile = read_profile(args.profile)
    block = recipe_benchmark_block(recipe)
    name = args.framework or profile.framework or block.framework or BENCHMARK_FRAMEWORK
    if profile.framework and profile.framework != name:
        warn(f"profile {profile.name} is for {profile.framework}; running {name} as asked")
    framework = load_framework(name)
    bench_args = merge_bench_args(framework, block.args, profile.args, bench_overrides(args.bench_args))
    timeout = args.timeout or profile.timeout or block.timeout or BENCHMARK_TIMEOUT
    tp = benchmark_tp(recipe, args)
    output = Path(args.output or default_output_name(recipe, profile, tp))
    home = hf_home(args.cache_dir)
    points = schedule_points(bench_args, profile.schedule or block.schedule)
    if args.dry_run:
        if not args.skip_run:
            launch(launch_namespace(args), recipe, selection)
        preview = BenchmarkJob("http://<head>:<port>/v1", recipe.model_repo, "<served model>", {}, "<tokenizer>",
                               str(bench_args.get("book_url") or "http://127.0.0.1:<port>" + PromptServer.path),
                               Path("<result.json>"), True)
        print(f"\nBenchmark ({framework.name}, {len(points)} run(s), timeout {timeout:.0f} s) -> {output}:")
        for point in points:
            print("  " + shlex.join(framework.argv(preview.replace(args=point))))
        return 0
    if not framework.available():
        raise SparkrunError(framework.install_hint or f"benchmark framework {framework.name} is not available")
    tokenizer, offline = resolve_tokenizer(str(bench_args.get("tokenizer") or recipe.model_repo), home)
    if args.sync_tuning:
        sync_registries_with_tuning()
    if args.skip_run:
        ssh = SSH(selection.user, args.verbose)
        target = running_target(ssh, recipe, selection, args.port if isinstance(args.port, int) else None)
        say(f"Benchmarking the running {target.cluster_id} at {target.endpoint}")
    else:
        plan, ssh = launch(launch_namespace(args), recipe, selection)
        target = target_from_plan(plan)
    image_id = container_image_id(ssh, target.head_host, target.head_container)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs: list[FrameworkRun] = []
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="sparkrun-bench-") as scratch, \
                PromptServer(prompt_text_file()) as prompt:
            deadline = time.monotonic() + timeout
            for index, point in enumerate(points):
                if len(points) > 1:
                    say(f"Benchmark point {index + 1}/{len(points)}: "
                        + ", ".join(f"{k} {point[k][0]}" for k in SCHEDULE_KEYS if k in point))
                job = BenchmarkJob(target.endpoint, recipe.model_repo, target.served_model, point, tokenizer,
                                   str(point.get("book_url") or prompt.url), Path(scratch) / f"result-{index}.json",
                                   offline)
                runs.append(run_framework(framework, job, deadline))
                if runs[-1].status != "complete":
                    break
    except BenchmarkInterrupted as exc:
        runs.append(exc.run)
        interrupted = True
    finally:
        record = benchmark_record(recipe, target, image_id, tp, framework, profile, bench_args, runs, home,
                                  started, timeout)
        atomic_write(output, yaml_text(record))
        if target.launched and not args.no_stop:
            say(f"Stopping {target.cluster_id} ...")
            remove_containers(ssh, target.containers)
        elif target.launched:
            say(detach_message(recipe.name, selection))
    print_benchmark_table(record["results"]["rows"])
    print(f"\nResults: {output}")
    if interrupted:
        say(BENCHMARK_INTERRUPTED.format(path=output))
        return 130
    if record["status"] == "timeout":
        raise SparkrunError(f"benchmark stopped after its timeout of {timeout:.0f} s; partial results in {output}")
    if record["status"] == "failed":
        code = next(r.exit_code for r in runs if r.status == "failed")
        raise SparkrunError(f"{framework.name} failed (exit {code}); see its output above and {output}")
    return 0


# -- Tuned MoE kernel configs: where they live, and what a launch mounts



DEFAULT_TUNE_TP = (1, 2, 4, 8)
REMOTE_TUNE_WORK = "~/.cache/sparkrun/tune"  # on the tuning host: sources, scratch, results
CONTAINER_TUNE_WORK = "/root/.cache/sparkrun/tune"
TUNE_JOB_TIMEOUT = 24 * 3600
CLONE_FAILED = ("could not fetch the {engine} tuning scripts from {repo} ({reason}); without network access, "
                "pass --skip-clone to use the scripts inside the image, or set {env} to a reachable mirror")
SCRIPT_NOT_IN_IMAGE = ("{script} is not in the image {image} (looked in its working directory, the {package} "
                       "package's source tree and {dirs}); drop --skip-clone to fetch it")














def sync_registries_with_tuning() -> None:
    """Fetch the newest configs of every registry that declares a tuning folder."""
    names = [e["name"] for e in enabled_registries() if e.get("tuning")]
    if names and not update_registries(names):
        warn("some registries could not be updated; using their last good tuning configs")








# -- tune: one tuning container, one job per TP size, configs copied back as each finishes

class TunePlan(Record):
    engine: TuningEngine
    host: str
    image: str
    model: str
    sizes: tuple  # to tune, in order
    skipped: tuple  # already tuned
    parallel: int
    output: Path
    container: ContainerSpec
    skip_clone: bool
    repo: str
    trust_remote_code: bool

    @property
    def work(self) -> str:
        return f"{CONTAINER_TUNE_WORK}/{self.engine.name}"

    def find_script(self) -> str:
        """Runs in the container: print the folder that holds the script (cloned, or in the image:
        its working directory, the engine package's source tree, the usual places)."""
        e = self.engine
        if not self.skip_clone:
            return (f"ver=$(python3 -c 'import {e.package}; print({e.package}.__version__)' 2>/dev/null)\n"
                    f"src={self.work}/src\n"
                    f"if [ ! -f \"$src/{e.script}\" ]; then\n"
                    f"  rm -rf \"$src\"\n"
                    f"  git clone --quiet --depth 1 --branch \"v$ver\" {shlex.quote(self.repo)} \"$src\" 2>/dev/null ||\n"
                    f"  git clone --quiet --depth 1 {shlex.quote(self.repo)} \"$src\" || exit 3\n"
                    f"fi\n[ -f \"$src/{e.script}\" ] || exit 4\necho \"$src\"\n")
        roots = " ".join(['"$PWD"', '"$pkg/.."', '"$pkg/../.."', *e.image_dirs])
        return (f"pkg=$(python3 -c 'import os, {e.package}; print(os.path.dirname(os.path.abspath({e.package}.__file__)))' "
                f"2>/dev/null)\nfor root in {roots}; do\n"
                f"  [ -f \"$root/{e.script}\" ] && {{ cd \"$root\" && pwd; exit 0; }}\ndone\nexit 4\n")

    def job(self, root: str, tp: int, subdir: str) -> str:
        """Runs in the container: tune one TP size in a scratch folder, move the JSON configs into
        the results folder and print their paths there."""
        work, out = f"{self.work}/work/tp{tp}", f"{self.work}/out" + (f"/{subdir}" if subdir else "")
        argv = ["python3", f"{root}/{self.engine.script}", "--model", self.model, "--tp-size", str(tp), "--tune"]
        if self.engine.name == "vllm":
            argv += ["--save-dir", work] + (["--trust-remote-code"] if self.trust_remote_code else [])
        return (f"set -e\nrm -rf {work}\nmkdir -p {work} {out}\ncd {work}\n"
                f"{shlex.join(argv)} > {work}.log 2>&1 || {{ rc=$?; tail -n 20 {work}.log; exit $rc; }}\n"
                f"for f in $(find . -name '*.json'); do mv \"$f\" {out}/; "
                f"echo \"@@config {subdir + '/' if subdir else ''}${{f##*/}}\"; done\n")

    def describe(self) -> str:
        lines = [f"Engine:      {self.engine.name}", f"Host:        {self.host}", f"Image:       {self.image}",
                 f"Model:       {self.model}", f"TP sizes:    {', '.join(map(str, self.sizes)) or 'none'}"
                 + (f" (already tuned: {', '.join(map(str, self.skipped))})" if self.skipped else ""),
                 f"Parallel:    {self.parallel}", f"Output:      {self.output}",
                 f"Scripts:     {'in the image' if self.skip_clone else self.repo}",
                 "", "Steps:", f"  1. [{self.host}] start the tuning container", f"     {self.container.shown()}"]
        for tp in self.sizes:
            lines.append(f"  - [{self.host}] docker exec {self.container.name} "
                         + shlex.join(["python3", f"<root>/{self.engine.script}", "--model", self.model,
                                       "--tp-size", str(tp), "--tune"]))
        lines.append(f"  then copy the configs to {self.output} and remove {self.container.name}")
        return "\n".join(lines)


def plan_tune(args, recipe: Recipe, selection: HostSelection) -> TunePlan:
    import hashlib

    engine = TUNING_ENGINES[args.engine]
    if tuning_engine_of(recipe.runtime) != engine.name and not args.image:
        raise UsageError(f"recipe {recipe.name} runs on {recipe.runtime}, not {engine.name}; "
                         f"pass --image with a {engine.name} image to tune with it")
    image = args.image or recipe.container
    if not image:
        raise UsageError(f"recipe {recipe.name} names no container image; pass --image")
    for what, value in (("--image", image), ("--cache-dir", args.cache_dir or "")):
        check_cli_value(what, value)
    if args.parallel < 1:
        raise UsageError("-j/--parallel must be at least 1")
    sizes = tuple(dict.fromkeys(args.tp or DEFAULT_TUNE_TP))
    if any(tp < 1 for tp in sizes):
        raise UsageError("--tp must be at least 1")
    output = Path(os.path.expanduser(args.output_dir)) if args.output_dir else tuning_dir(engine.name)
    done = tuned_sizes(output, recipe.model_repo)
    host = selection.head
    name = "sparkrun_tune_" + hashlib.sha256(f"{engine.name}|{recipe.model}|{host}".encode()).hexdigest()[:10]
    mounts = ((args.cache_dir or "~/.cache/huggingface", CONTAINER_HF_HOME),
              (f"{REMOTE_TUNE_WORK}/{engine.name}", f"{CONTAINER_TUNE_WORK}/{engine.name}"))
    env = [("HF_HOME", CONTAINER_HF_HOME)]
    if local_snapshot(recipe, hf_home(args.cache_dir)):
        env.append(("HF_HUB_OFFLINE", "1"))  # its config is synced to the host first
    secret = [("HF_TOKEN", os.environ["HF_TOKEN"])] if os.environ.get("HF_TOKEN") else []
    SECRET_VALUES.update(v for _, v in secret if len(v) >= 4)
    spec = ContainerSpec(host=host, name=name, role="tune", image=image, command="sleep infinity", env=tuple(env),
                         secret_env=tuple(secret), mounts=mounts,
                         labels=(("sparkrun.tune", engine.name), ("sparkrun.model", recipe.model)))
    return TunePlan(engine, host, image, recipe.model_repo, tuple(tp for tp in sizes if tp not in done),
                    tuple(tp for tp in sizes if tp in done), args.parallel, output, spec, args.skip_clone,
                    os.environ.get(engine.repo_env) or engine.repo, "--trust-remote-code" in recipe.command)


def tune_model_files(recipe: Recipe, home: Path) -> ModelSnapshot | None:
    """The model's small files (config, tokenizer, code): all the tuning scripts read of it."""
    snapshot = local_snapshot(recipe, home)
    if snapshot is None:
        return None
    small = tuple(f for f in snapshot.files if f[0].endswith((".json", ".py", ".txt", ".model", ".jinja")))
    return snapshot.replace(files=small) if small else None


def cmd_tune(args) -> int:
    recipe = find_recipe(args.recipe)
    selection = select_hosts(args)
    plan = plan_tune(args, recipe, selection)
    if args.dry_run:
        print(plan.describe())
        return 0
    for tp in plan.skipped:
        say(f"TP {tp}: already tuned for {plan.model} in {plan.output}; skipped")
    if not plan.sizes:
        print(f"Nothing to tune: TP {', '.join(map(str, plan.skipped))} already tuned in {plan.output}.")
        return 0
    ssh = SSH(selection.user, args.verbose)
    facts = probe_hosts(ssh, [plan.host], images=(plan.image,))
    fact = facts[plan.host]
    if isinstance(fact, HostError):
        raise fact
    if fact.docker_error:
        raise RemoteFailed(plan.host, DOCKER_HELP if "permission denied" in fact.docker_error.lower()
                           else f"docker is not working: {fact.docker_error[:200]}")
    distribute_image(ssh, plan.image, facts, [plan.host])
    files = tune_model_files(recipe, hf_home(args.cache_dir))
    if files:
        sync_snapshot(ssh, files, facts, [plan.host], remote_cache_root(args.cache_dir))
    else:
        warn(f"model {recipe.model} is not in the local Hugging Face cache; the tuning scripts on "
             f"{plan.host} must find its config there or on the Hub")
    plan.output.mkdir(parents=True, exist_ok=True)
    container = plan.container.name
    ssh.run(plan.host, f"docker rm -f {container} >/dev/null 2>&1 || true\n", timeout=60)
    say(f"[{plan.host}] starting the tuning container {container}")
    try:
        start_container(ssh, plan.container, timeout=300)
        tune_in_container(ssh, plan)
    except KeyboardInterrupt:
        say("Interrupted: removing the tuning container ...")
        raise SparkrunError(f"tuning interrupted; configs finished so far are in {plan.output}") from None
    finally:
        remove_containers(ssh, {plan.host: [container]})
    print(f"Tuned TP {', '.join(map(str, plan.sizes))} for {plan.model}: configs in {plan.output}")
    return 0


def exec_in(container: str, script: str) -> str:
    return shlex.join(["docker", "exec", container, "bash", "-c", script]) + "\n"


def tune_in_container(ssh: SSH, plan: TunePlan) -> None:
    """Find (or fetch) the script, then run one job per TP size, `plan.parallel` at a time."""
    import queue

    container, host, engine = plan.container.name, plan.host, plan.engine
    found = ssh.run(host, exec_in(container, plan.find_script()), timeout=1800)
    if found.returncode == 3:
        reason = found.stderr.strip().splitlines()[-1] if found.stderr.strip() else "git clone failed"
        raise SparkrunError(CLONE_FAILED.format(engine=engine.name, repo=plan.repo,
                                                reason=reason.removeprefix("fatal: "), env=engine.repo_env))
    if not found.ok or not found.stdout.strip():
        raise SparkrunError(SCRIPT_NOT_IN_IMAGE.format(script=engine.script, image=plan.image, package=engine.package,
                                                       dirs=", ".join(engine.image_dirs)) if plan.skip_clone else
                            f"{plan.repo} has no {engine.script}; check {engine.repo_env}")
    root = found.stdout.strip().splitlines()[-1]
    subdir = ""
    if engine.name == "sglang":  # SGLang reads configs/triton_<version>/ (plain configs/ before that)
        version = ssh.run(host, exec_in(container, "python3 -c 'import triton; print(triton.__version__)' 2>/dev/null"),
                          timeout=120).stdout.strip()
        subdir = "triton_" + version.replace(".", "_") if re.fullmatch(r"[0-9][0-9A-Za-z.+_-]*", version) else ""
    say(f"Tuning {plan.model} for TP {', '.join(map(str, plan.sizes))} on {host}, {plan.parallel} at a time "
        f"(scripts in {root})")
    todo: queue.Queue = queue.Queue()
    for tp in plan.sizes:
        todo.put(tp)
    lock = threading.Lock()
    failures: list[str] = []
    crashed: list[BaseException] = []

    def worker():
        while not failures and not crashed:
            try:
                tp = todo.get_nowait()
            except queue.Empty:
                return
            start = time.monotonic()
            say(f"[{host}] TP {tp}: tuning ...")
            try:
                result = ssh.run(host, exec_in(container, plan.job(root, tp, subdir)), timeout=TUNE_JOB_TIMEOUT)
                if not result.ok:
                    failures.append(f"TP {tp} failed (exit {result.returncode}): "
                                    + " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:]))
                    continue
                configs = [line.split(None, 1)[1] for line in result.stdout.splitlines()
                           if line.startswith("@@config ")]
                with lock:
                    collect_tuned(ssh, plan, tp, configs)
                say(f"[{host}] TP {tp}: done in {time.monotonic() - start:.0f} s ({len(configs)} config(s))")
            except HostError as exc:
                failures.append(f"TP {tp}: {exc}")
            except BaseException as exc:  # re-raised in the main thread
                crashed.append(exc)

    run_threads([threading.Thread(target=worker, daemon=True) for _ in range(min(plan.parallel, len(plan.sizes)))])
    if crashed:
        raise crashed[0]
    if failures:
        raise SparkrunError("tuning failed: " + "; ".join(failures))


def collect_tuned(ssh: SSH, plan: TunePlan, tp: int, configs: list[str]) -> None:
    """Copy this TP size's configs here and record them in the manifest."""
    remote = f"{REMOTE_TUNE_WORK.removeprefix(HOME_PREFIX)}/{plan.engine.name}/out/"
    listing = cache_dir() / f"tune-{os.getpid()}-{tp}.list"
    atomic_write(listing, "".join(f"{c}\n" for c in configs))
    argv = ["rsync", "-a", f"--files-from={listing}", "-e", ssh.rsync_shell(), f"{plan.host}:{remote}",
            f"{plan.output}/"]
    if ssh.verbose >= 2:
        print(f"[{plan.host}] {shlex.join(argv)}", file=sys.stderr)
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    finally:
        listing.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RemoteFailed(plan.host, f"copying tuned configs back failed: {done.stderr.strip()[-300:]}")
    change_tuning_manifest(plan.output, lambda manifest: manifest["models"].setdefault(plan.model, {}).update(
        {str(tp): {"files": sorted(configs), "image": plan.image, "tuned": time.strftime("%Y-%m-%d %H:%M")}}))


# -- CLI: registered by sparkrun's build_parser

def add_parsers(sub, command, host_options) -> None:
    """`benchmark` (sharing run's launch options) and `tune`."""
    run = sub.choices["run"]
    p = command("benchmark", cmd_benchmark, COMMAND_HELP["benchmark"])
    p.add_argument("recipe", help="recipe name, @registry/name, or a path to a YAML file")
    host_options(p)
    shared = {"port", "tp", "gpu_mem", "max_model_len", "image", "cache_dir", "dry_run", "detect", "replace",
              "no_sync", "download_on", "no_drop_cache", "strict", "ready_timeout", "memory_floor", "init_port",
              "ray_port", "dashboard", "dashboard_port", "no_sync_tuning", "pull"}
    for action in run._actions:
        if action.dest in shared:
            p._add_action(action)  # run's own definitions (as argparse's parents= does): they cannot drift
    p.add_argument("--profile", help="benchmark profile: a name, @registry/name, or a YAML file")
    p.add_argument("--framework", help=f"benchmark framework (default {BENCHMARK_FRAMEWORK}; more through the "
                                       f"'{BENCHMARK_ENTRY_POINTS}' entry points)")
    p.add_argument("--out", "--output", dest="output", metavar="FILE",
                   help="results YAML (default benchmark_<recipe>_<profile>_tp<N>.yaml)")
    p.add_argument("-o", "--option", dest="bench_args", action="append", default=[], metavar="KEY=VALUE",
                   help="set a benchmark arg, e.g. -o depth=0,4096 -o runs=1 (repeatable)")
    p.add_argument("--no-stop", action="store_true", help="leave the server running afterwards")
    p.add_argument("--skip-run", action="store_true",
                   help="benchmark the instance of this recipe that is already running (found by its labels)")
    p.add_argument("--sync-tuning", action="store_true",
                   help="update the registries' tuning configs before launching")
    p.add_argument("--timeout", type=float, help=f"seconds for the whole benchmark (default {BENCHMARK_TIMEOUT}, "
                                                 "or the profile's)")

    p = command("tune", cmd_tune, COMMAND_HELP["tune"])
    p.add_argument("engine", choices=sorted(TUNING_ENGINES), help="the engine to tune for")
    p.add_argument("recipe", help="recipe name, @registry/name, or a path to a YAML file")
    host_options(p, solo=False)
    p.add_argument("--tp", type=int, action="append", metavar="N",
                   help="a TP size to tune (repeatable; default 1, 2, 4, 8)")
    p.add_argument("-j", "--parallel", type=int, default=1, metavar="N", help="tuning jobs at a time (1)")
    p.add_argument("--image", help="container image instead of the recipe's")
    p.add_argument("--output-dir", help="where the configs go (default <cache>/tuning/<engine>, which "
                                        "later runs mount)")
    p.add_argument("--cache-dir", help="Hugging Face cache on the host (default ~/.cache/huggingface)")
    p.add_argument("--skip-clone", action="store_true",
                   help="use the tuning scripts inside the image instead of fetching them")
    p.add_argument("-n", "--dry-run", action="store_true", help="print what would run; contact no host")
