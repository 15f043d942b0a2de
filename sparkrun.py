#!/usr/bin/env python3
"""sparkrun: launch, watch and stop LLM inference servers on DGX Spark hosts over SSH.

Pipeline, one way only:

    CLI args -> recipe (load, validate, resolve runtime, render)
             -> plan (hosts, per-host container specs and steps: pure data; --dry-run prints it)
             -> execution (ssh + docker on each host, one SSH connection per host)
             -> readiness, then logs.

Sections, in data-flow order:
    1. Errors and messages
    2. Config and paths
    3. Recipes: load, validate, resolve runtime, render
    4. Catalog: bundled recipes, registries, lookup
    5. VRAM estimate
    6. Hosts and SSH
    7. Clusters
    8. Launch plan
    9. Execution: preflight, launch, readiness, stop, logs, status
    10. CLI
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __name__ == "__main__":
    # Runtime modules do `from sparkrun import ...`; let them find this module, not a second copy.
    sys.modules.setdefault("sparkrun", sys.modules["__main__"])

__version__ = "0.1.0"

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# 1. Errors and messages
# ---------------------------------------------------------------------------

class SparkrunError(Exception):
    """A failure the user can act on: printed as one line, exit code `exit_code`."""

    exit_code = 1


class UsageError(SparkrunError):
    """Bad input: a malformed recipe, a bad value, an unknown name."""

    exit_code = 2


class RecipeError(UsageError):
    def __init__(self, source: str, message: str):
        super().__init__(f"{source}: {message}")


def warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


def use_color(stream=sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if use_color() else text


# ---------------------------------------------------------------------------
# 2. Config and paths
# ---------------------------------------------------------------------------

def config_dir() -> Path:
    explicit = os.environ.get("SPARKRUN_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "sparkrun"


def cache_dir() -> Path:
    explicit = os.environ.get("SPARKRUN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparkrun"


def hf_home(cache_dir_option: str | None = None) -> Path:
    """The Hugging Face cache root (the folder holding `hub/`): --cache-dir > HF_HOME > default."""
    chosen = cache_dir_option or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(os.path.expanduser(chosen))


def resource_dir(name: str) -> Path:
    """`recipes` or `runtimes`: beside this file in a checkout, `sparkrun_<name>` when installed."""
    checkout = HERE / name
    return checkout if checkout.is_dir() else HERE / f"sparkrun_{name}"


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# 3. Recipes: load, validate, resolve runtime, render
# ---------------------------------------------------------------------------

RUNTIMES = ("vllm-distributed", "vllm-ray", "sglang", "llama-cpp", "eugr-vllm")
RUNTIME_ALIASES = {"vllm": "vllm", "llama.cpp": "llama-cpp", "llamacpp": "llama-cpp"}

# Field name -> accepted types. Fields not listed here are kept in runtime_config.
RECIPE_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "model_revision": (str,),
    "runtime": (str,),
    "recipe_version": (str, int, float),
    "min_nodes": (int,),
    "max_nodes": (int,),
    "mode": (str,),
    "solo_only": (bool,),
    "cluster_only": (bool,),
    "container": (str,),
    "metadata": (dict,),
    "defaults": (dict,),
    "env": (dict,),
    "command": (str,),
    "runtime_config": (dict,),
    "benchmark": (dict,),
    "mods": (list,),
    "build_args": (list,),
    "pre_exec": (str, list),
    "post_exec": (str, list),
    # Present in version "1" (eugr) recipes.
    "name": (str,),
    "description": (str,),
}
MODES = ("auto", "solo", "cluster")
PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
V1_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters that could end a shell word or start a substitution when a CLI value is
# pasted into a recipe command.
SHELL_UNSAFE = re.compile(r"[;&|$`<>\\\n\r]")

TYPED_FLAGS = {  # CLI flag destination -> recipe default it overrides
    "port": "port",
    "tp": "tensor_parallel",
    "gpu_mem": "gpu_memory_utilization",
    "max_model_len": "max_model_len",
}


@dataclass
class Recipe:
    name: str
    path: Path
    source: str  # "Local" for bundled or a file path, else the registry name
    model: str = ""
    model_revision: str | None = None
    declared_runtime: str | None = None
    recipe_version: str = "2"
    min_nodes: int = 1
    max_nodes: int | None = None
    mode: str = "auto"
    solo_only: bool = False
    cluster_only: bool = False
    container: str = ""
    metadata: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    command: str = ""
    runtime_config: dict = field(default_factory=dict)
    benchmark: dict = field(default_factory=dict)
    mods: list = field(default_factory=list)
    build_args: list = field(default_factory=list)
    pre_exec: list = field(default_factory=list)
    post_exec: list = field(default_factory=list)
    unknown_keys: tuple = ()
    text: str = ""

    @property
    def runtime(self) -> str:
        return resolve_runtime(self)

    @property
    def description(self) -> str:
        return str(self.metadata.get("description", ""))

    @property
    def gguf_quant(self) -> str | None:
        """`Q8_0` for a model written `repo:Q8_0`."""
        return self.model.rpartition(":")[2] if ":" in self.model else None

    @property
    def model_repo(self) -> str:
        return self.model.partition(":")[0]


class ParsedYamlCache:
    """Parsed YAML files (recipes, registry manifests, config) kept as JSON, keyed by path and
    checked by mtime and size, so that a warm `list` or `show` imports no YAML parser."""

    def __init__(self):
        self.path = cache_dir() / "yaml-cache.json"
        self.entries: dict | None = None
        self.dirty = False

    def _load(self) -> dict:
        if self.entries is None:
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}
        return self.entries

    def get(self, path: Path, stamp: str):
        entry = self._load().get(str(path))
        return entry["data"] if entry and entry["stamp"] == stamp else None

    def put(self, path: Path, stamp: str, data) -> None:
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            return  # YAML-only types (dates, sets): parse again next time
        self._load()[str(path)] = {"stamp": stamp, "data": data}
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            try:
                atomic_write(self.path, json.dumps(self.entries))
            except OSError:
                pass  # a read-only cache only costs speed
            self.dirty = False


YAML_CACHE = ParsedYamlCache()


def read_yaml_file(path: Path) -> tuple[str, object]:
    """(text, parsed data) of a YAML file, through the parsed-YAML cache. Call
    YAML_CACHE.save() once a command has read what it needs."""
    path = Path(path)
    try:
        stat = path.stat()
        stamp = f"{stat.st_mtime_ns}:{stat.st_size}"
        data = YAML_CACHE.get(path, stamp)
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(str(path), f"cannot read: {exc.strerror}") from None
    if data is None:
        data = parse_yaml(text, str(path))
        YAML_CACHE.put(path, stamp, data)
    return text, data


def load_recipe(path: Path, source: str = "Local") -> Recipe:
    """Read and validate one recipe file; errors name the file and the field."""
    text, data = read_yaml_file(path)
    return recipe_from_mapping(data, Path(path), source, text)


def parse_yaml(text: str, where: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(where, f"malformed YAML{line}: {problem}") from None


def recipe_from_mapping(data, path: Path, source: str, text: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(str(path), "a recipe must be a YAML mapping of fields")
    recipe = Recipe(name=path.stem, path=path, source=source, text=text)
    unknown = []
    for key, value in data.items():
        if key not in RECIPE_FIELDS:
            unknown.append(str(key))
            recipe.runtime_config[str(key)] = value
            continue
        if value is None:
            continue
        expected = RECIPE_FIELDS[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join(t.__name__.replace("str", "string").replace("int", "integer")
                                for t in expected)
            raise RecipeError(str(path), f"field '{key}' must be {names}, not {value!r}")
        _set_field(recipe, key, value)
    recipe.unknown_keys = tuple(unknown)
    _check_recipe(recipe)
    return recipe


def _set_field(recipe: Recipe, key: str, value) -> None:
    if key == "runtime":
        recipe.declared_runtime = value.strip()
    elif key == "recipe_version":
        recipe.recipe_version = str(value).split(".")[0] if isinstance(value, float) else str(value)
    elif key in ("pre_exec", "post_exec"):
        setattr(recipe, key, [value] if isinstance(value, str) else list(value))
    elif key == "description":
        recipe.metadata.setdefault("description", value)
    elif key == "name":
        recipe.metadata.setdefault("display_name", value)
    elif key == "runtime_config":
        recipe.runtime_config.update(value)
    else:
        setattr(recipe, key, value)


def _check_recipe(recipe: Recipe) -> None:
    where = str(recipe.path)
    if not recipe.model:
        raise RecipeError(where, "field 'model' is required")
    if not recipe.command:
        raise RecipeError(where, "field 'command' is required")
    if recipe.recipe_version not in ("1", "2"):
        raise RecipeError(where, f"field 'recipe_version' must be \"1\" or \"2\", not {recipe.recipe_version!r}")
    if recipe.min_nodes < 1:
        raise RecipeError(where, "field 'min_nodes' must be at least 1")
    if recipe.max_nodes is not None and recipe.max_nodes < recipe.min_nodes:
        raise RecipeError(where, f"field 'max_nodes' ({recipe.max_nodes}) is less than "
                                 f"min_nodes ({recipe.min_nodes})")
    if recipe.mode not in MODES:
        raise RecipeError(where, f"field 'mode' must be one of {', '.join(MODES)}")
    if recipe.solo_only and recipe.cluster_only:
        raise RecipeError(where, "fields 'solo_only' and 'cluster_only' cannot both be true")
    declared = recipe.declared_runtime
    if declared is not None and RUNTIME_ALIASES.get(declared, declared) not in RUNTIMES + ("vllm",):
        if not _plugin_runtime_names() or declared not in _plugin_runtime_names():
            raise RecipeError(where, f"field 'runtime': unknown runtime '{declared}' "
                                     f"(known: vllm, {', '.join(RUNTIMES)})")
    for key in ("defaults", "env", "metadata"):
        for name in getattr(recipe, key):
            if not isinstance(name, str):
                raise RecipeError(where, f"field '{key}': key {name!r} must be a string")


def _plugin_runtime_names() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="sparkrun.runtimes")}


def resolve_runtime(recipe: Recipe) -> str:
    """The runtime that will launch this recipe (see the runtime rules in README)."""
    declared = recipe.declared_runtime
    declared = RUNTIME_ALIASES.get(declared, declared) if declared else None
    if recipe.recipe_version == "1" or (declared in (None, "vllm") and recipe.build_args):
        return "eugr-vllm"
    if declared and declared != "vllm":
        return declared
    if declared is None:
        detected = detect_runtime_from_command(recipe.command)
        if detected != "vllm":
            return detected
    return "vllm-ray" if _hints_ray(recipe) else "vllm-distributed"


def detect_runtime_from_command(command: str) -> str:
    words = command.replace("\\\n", " ").split()
    first = " ".join(words[:3])
    if first.startswith("vllm serve") or first.startswith("python3 -m vllm") or first.startswith("python -m vllm"):
        return "vllm"
    if first.startswith("sglang serve") or "sglang.launch_server" in first:
        return "sglang"
    if words and words[0] in ("llama-server", "./llama-server"):
        return "llama-cpp"
    return "vllm"


def _hints_ray(recipe: Recipe) -> bool:
    if str(recipe.defaults.get("distributed_executor_backend", "")).lower() == "ray":
        return True
    return bool(re.search(r"--distributed-executor-backend[ =]+ray\b", recipe.command))


BUILTIN_VALUES = {"host": "0.0.0.0", "port": 8000}


def coerce_value(text: str):
    """`-o key=value` values: true/false, integers and floats become typed."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"-o {pair!r}: expected key=value with a simple key name")
        check_cli_value(f"-o {key}", value)
        overrides[key] = coerce_value(value)
    return overrides


def check_cli_value(what: str, value: str) -> None:
    if SHELL_UNSAFE.search(value):
        raise UsageError(f"{what}: value {value!r} contains shell metacharacters; not accepted")


def typed_overrides(args) -> dict:
    """Overrides from the typed flags (--port, --tp, --gpu-mem, --max-model-len)."""
    values = {}
    for dest, key in TYPED_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[key] = value
    gpu_mem = values.get("gpu_memory_utilization")
    if gpu_mem is not None and not 0 < gpu_mem <= 1:
        raise UsageError(f"--gpu-mem must be greater than 0 and at most 1 (a fraction of GPU memory), not {gpu_mem}")
    return values


def recipe_values(recipe: Recipe, overrides: dict | None = None) -> dict:
    """Template values: CLI overrides > recipe defaults > built-ins."""
    values = dict(BUILTIN_VALUES)
    values["model"] = recipe.model
    values.update(recipe.defaults)
    values.update(overrides or {})
    return values


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def command_placeholders(recipe: Recipe) -> list[str]:
    pattern = V1_TOKEN if recipe.recipe_version == "1" else PLACEHOLDER
    return [m.group(1) for m in pattern.finditer(recipe.command) if m.group(1)]


def render_command(recipe: Recipe, values: dict) -> str:
    """Fill `{key}` placeholders. Version "1" commands also unescape `{{` and `}}`;
    version "2" commands keep every other brace (raw JSON) untouched."""
    missing = sorted({k for k in command_placeholders(recipe) if k not in values})
    if missing:
        raise UsageError(f"recipe {recipe.name}: no value for {', '.join('{' + k + '}' for k in missing)}; "
                         f"add it to defaults or pass -o {missing[0]}=...")

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key is None:
            return match.group(0)[0]
        return format_value(values[key])

    pattern = V1_TOKEN if recipe.recipe_version == "1" else PLACEHOLDER
    return pattern.sub(fill, recipe.command)


def one_line(command: str) -> str:
    """The command as one line: backslash-newline continuations joined."""
    return " ".join(re.sub(r"\\\s*\n", " ", command).split())


def validate_recipe(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(errors, warnings) that do not stop a recipe from loading."""
    errors, warnings = [], []
    values = recipe_values(recipe)
    missing = sorted({k for k in command_placeholders(recipe) if k not in values})
    if missing:
        errors.append(f"command uses {', '.join('{' + k + '}' for k in missing)} with no default value")
    for key in recipe.unknown_keys:
        warnings.append(f"unknown field '{key}' kept in runtime_config")
    gpu_mem = recipe.defaults.get("gpu_memory_utilization")
    if gpu_mem is not None and not (isinstance(gpu_mem, (int, float)) and 0 < gpu_mem <= 1):
        warnings.append(f"defaults.gpu_memory_utilization is {gpu_mem!r}, not a fraction in (0, 1]; "
                        "the VRAM estimate ignores it")
    if recipe.runtime == "llama-cpp" and recipe.min_nodes > 1:
        warnings.append("llama-cpp multi-node (rpc-server) is experimental")
    return errors, warnings


def node_count(recipe: Recipe, values: dict) -> int:
    """Nodes a launch needs: one GPU per Spark, so tensor x pipeline parallel."""
    def as_int(key):
        try:
            return max(1, int(values.get(key) or 1))
        except (TypeError, ValueError):
            raise UsageError(f"recipe {recipe.name}: '{key}' must be a whole number, not {values.get(key)!r}") from None

    return max(recipe.min_nodes, as_int("tensor_parallel") * as_int("pipeline_parallel"))


# ---------------------------------------------------------------------------
# 4. Catalog: bundled recipes, registries, lookup
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeRef:
    """Where a recipe lives, before it is parsed."""
    name: str
    path: Path
    source: str  # "Local" (bundled) or a registry name
    visible: bool = True

    @property
    def qualified(self) -> str:
        return self.name if self.source == "Local" else f"@{self.source}/{self.name}"


def bundled_refs() -> list[RecipeRef]:
    folder = resource_dir("recipes")
    return [RecipeRef(p.stem, p, "Local") for p in sorted(folder.glob("*.yaml"))]


def catalog(include_hidden: bool = False) -> list[RecipeRef]:
    refs = bundled_refs()
    return [r for r in refs if r.visible or include_hidden]


def find_recipe(name: str, *, include_hidden: bool = True, runtime: str | None = None) -> Recipe:
    """A path to a file, a bundled name, or `@registry/name`; suggestions on a miss."""
    as_path = Path(os.path.expanduser(name))
    if name.endswith((".yaml", ".yml")) or os.sep in name and not name.startswith("@"):
        if as_path.is_file():
            return load_recipe(as_path, source="Local")
        if name.endswith((".yaml", ".yml")) or as_path.parent.is_dir():
            raise UsageError(f"recipe file not found: {name}")
    refs = catalog(include_hidden=include_hidden)
    if name.startswith("@"):
        source, _, short = name[1:].partition("/")
        matches = [r for r in refs if r.source == source and r.name == short]
    else:
        matches = [r for r in refs if r.name == name]
    if len(matches) > 1 and runtime:
        parsed = [load_recipe(r.path, r.source) for r in matches]
        chosen = [p for p in parsed if p.runtime.startswith(runtime)]
        if len(chosen) == 1:
            return chosen[0]
    if len(matches) > 1:
        names = ", ".join(r.qualified for r in matches)
        raise UsageError(f"recipe name '{name}' is ambiguous: {names}; use one of these names")
    if not matches:
        wanted = name.lstrip("@").rpartition("/")[2]
        known = sorted({r.name for r in refs})
        close = [n for n in known if wanted in n][:3] or difflib.get_close_matches(wanted, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see 'sparkrun list'"
        raise UsageError(f"no recipe named '{name}'{hint}")
    ref = matches[0]
    recipe = load_recipe(ref.path, ref.source)
    YAML_CACHE.save()
    return recipe


@dataclass(frozen=True)
class RecipeSummary:
    """What `list` and `search` show."""
    name: str
    qualified: str
    source: str
    runtime: str
    model: str
    description: str
    min_nodes: int
    max_nodes: int | None
    visible: bool
    path: str


def summarize(refs: list[RecipeRef]) -> list[RecipeSummary]:
    summaries = []
    for ref in refs:
        try:
            recipe = load_recipe(ref.path, ref.source)
        except RecipeError as exc:
            warn(str(exc))
            continue
        summaries.append(RecipeSummary(ref.name, ref.qualified, ref.source, recipe.runtime, recipe.model,
                                       recipe.description, recipe.min_nodes, recipe.max_nodes,
                                       ref.visible, str(ref.path)))
    YAML_CACHE.save()
    return summaries


def search_summaries(summaries: list[RecipeSummary], query: str | None) -> list[RecipeSummary]:
    if not query:
        return summaries
    words = query.lower().split()
    return [s for s in summaries
            if all(w in f"{s.qualified} {s.model} {s.description} {s.runtime}".lower() for w in words)]


def nodes_text(min_nodes: int, max_nodes: int | None) -> str:
    if max_nodes == min_nodes:
        return str(min_nodes)
    return f"{min_nodes} - {max_nodes if max_nodes is not None else 'unlimited'}"


# ---------------------------------------------------------------------------
# 5. VRAM estimate
# ---------------------------------------------------------------------------
# Does a recipe's model plus its KV cache fit in a DGX Spark's GPU memory? Weights come from the
# real on-disk size when the model is in the local Hugging Face cache, else parameters x bytes per
# parameter. The KV cache counts only the layers that keep one (hybrid and sliding-window models
# keep fewer; MLA keeps a compressed latent). "GB" is 2**30 bytes throughout.

GIB = 2**30
SPARK_GPU_GB = 121  # of the 128 GB unified memory, what the GPU can use
YES, NO, UNKNOWN = "YES", "NO", "UNKNOWN"
FROM_PARAMS, FROM_DISK = "params×dtype", "on-disk size"

_BYTES_PER_PARAM = {
    "fp32": 4, "float32": 4, "f32": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "f16": 2, "half": 2,
    "fp8": 1, "float8": 1, "int8": 1, "w8a8": 1,
    "int4": 0.5, "awq": 0.5, "gptq": 0.5, "autoround": 0.5, "w4a16": 0.5,
    "nvfp4": 0.7,  # effective: 4-bit weights plus scales and the layers kept in higher precision
}
# GGUF quants by real bits per weight (block scales included), as llama.cpp reports them.
_GGUF_BITS_PER_WEIGHT = {
    "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.69, "q5_k_s": 5.54, "q5_1": 6.0, "q5_0": 5.5,
    "q4_k_m": 4.85, "q4_k_s": 4.58, "q4_1": 5.0, "q4_0": 4.5,
    "q3_k_l": 4.27, "q3_k_m": 3.91, "q3_k_s": 3.5, "q2_k": 2.63,
    "iq4_xs": 4.25, "iq4_nl": 4.5, "iq3_m": 3.66, "iq3_s": 3.44, "iq3_xs": 3.3, "iq3_xxs": 3.06,
    "iq2_m": 2.7, "iq2_s": 2.5, "iq2_xs": 2.31, "iq2_xxs": 2.06, "iq1_m": 1.75, "iq1_s": 1.56,
    "mxfp4": 4.25,  # also used for Hugging Face mxfp4 checkpoints: 4-bit values + one scale per 32
}
_GGUF_ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "q8_k": "q8_0"}
_PARAM_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def _positive_int(value) -> int | None:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_param_count(value) -> int | None:
    """'30B', '1.7B', '235M', '1.2T', '30,000,000,000' or a number -> parameter count."""
    if isinstance(value, float) and math.isfinite(value) and value > 0:
        return round(value)
    if not isinstance(value, str):
        return _positive_int(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmbt]?)", re.sub(r"[,_\s]", "", value.lower()))
    if match is None:
        return None
    return round(float(match[1]) * _PARAM_SCALE[match[2]]) or None


def _known_bytes_per_param(name: str) -> float | None:
    name = _GGUF_ALIASES.get(name, name)
    if name in _GGUF_BITS_PER_WEIGHT:
        return _GGUF_BITS_PER_WEIGHT[name] / 8
    return _BYTES_PER_PARAM.get(name)


def bytes_per_param(dtype: str) -> float | None:
    """Case-insensitive: 'Q8_0', 'UD-Q4_K_XL', 'nvfp4', 'fp8_e4m3', 'int4-autoround', 'bfloat16'."""
    if not isinstance(dtype, str):
        return None
    name = re.sub(r"[\s-]+", "_", dtype.strip().lower()).removeprefix("ud_")
    name = name.removesuffix("_xl")  # unsloth's _XL mixes are sized as their base quant
    found = _known_bytes_per_param(name)
    # Compound names ('int4_autoround', 'fp8_e4m3', 'awq_marlin'): the first known part decides.
    return found or next(filter(None, map(_known_bytes_per_param, name.split("_"))), None)


def resolve_kv_dtype(*candidates: str | None) -> str:
    """First explicit KV dtype in priority order; 'auto' or nothing means bfloat16."""
    for value in candidates:
        name = str(value).strip().lower() if value is not None else ""
        if name and name != "auto":
            return {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    return "bfloat16"


# -- model architecture

@dataclass(frozen=True)
class ModelArch:
    num_layers: int | None = None
    kv_layers: int | None = None  # layers keeping the whole context; None means all num_layers
    sliding_layers: int = 0  # layers keeping only the last sliding_window tokens
    sliding_window: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mla_dim: int | None = None  # kv_lora_rank + qk_rope_head_dim (DeepSeek-style MLA)
    note: str = ""

    @property
    def missing(self) -> tuple[str, ...]:
        needed = {"num_layers": self.num_layers}
        if not self.mla_dim:
            needed |= {"num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        return tuple(name for name, value in needed.items() if value is None)


def _arch(num_layers, num_kv_heads, head_dim, kv_layers=None, sliding_layers=0, sliding_window=None,
          mla_dim=None) -> ModelArch:
    kv_layers = num_layers if kv_layers is None else kv_layers
    if mla_dim:
        note = f"MLA compressed KV: {mla_dim} dims"
    elif sliding_layers:
        note = f"{kv_layers} full + {sliding_layers} sliding window {sliding_window}"
    elif num_layers and kv_layers < num_layers:
        note = f"{kv_layers} keep KV: hybrid"
    else:
        note = ""
    return ModelArch(num_layers, kv_layers, sliding_layers, sliding_window if sliding_layers else None,
                     num_kv_heads, head_dim, mla_dim, note)


_NO_KV_LAYER_TYPES = {"linear_attention", "mamba", "mamba2", "conv", "ssm", "recurrent"}


def _layer_split(config: dict, num_layers: int | None) -> tuple:
    """(num_layers, full-KV layers, sliding layers, window) from the config's layer layout."""
    window = _positive_int(config.get("sliding_window"))
    if config.get("use_sliding_window") is False:
        window = None
    types, pattern = config.get("layer_types"), config.get("hybrid_override_pattern")
    if isinstance(types, list) and types:
        types = types[:num_layers] if num_layers else types
        sliding = types.count("sliding_attention") if window else 0
        no_kv = sum(kind in _NO_KV_LAYER_TYPES for kind in types)
        return len(types), len(types) - no_kv - sliding, sliding, window
    if isinstance(pattern, str) and pattern:  # Nemotron-H: '*' attention, 'M' Mamba, '-' MLP, 'E' MoE
        return num_layers or len(pattern), pattern.count("*"), 0, None
    if num_layers is None:
        return None, None, 0, None
    if interval := _positive_int(config.get("full_attention_interval")):
        return num_layers, num_layers // interval, 0, None
    if not window:
        return num_layers, num_layers, 0, None
    every = _positive_int(config.get("sliding_window_pattern"))
    if every is None and str(config.get("model_type", "")).startswith("gemma2"):
        every = 2  # Gemma 2 alternates sliding and global layers without saying so
    full_layers = config.get("max_window_layers")  # Qwen2 style: layers from this index on slide
    if every:
        full = num_layers // every
    elif isinstance(full_layers, int) and not isinstance(full_layers, bool):
        full = min(max(full_layers, 0), num_layers)
    else:
        full = 0  # Mistral style: every layer slides
    return num_layers, full, num_layers - full, window


def arch_from_config(config: dict) -> ModelArch | None:
    """Architecture from a Hugging Face config.json; None if it names no relevant field."""
    if not isinstance(config, dict):
        return None
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            config = {**config, **config[key]}
            break

    def first(*keys):
        return next(filter(None, (_positive_int(config.get(key)) for key in keys)), None)

    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd")
    kv_heads = first("num_key_value_heads", "num_kv_heads") or heads
    head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
    rank, rope = first("kv_lora_rank"), first("qk_rope_head_dim")
    mla_dim = rank + rope if rank and rope else None
    layers = first("num_hidden_layers", "num_layers", "n_layer")
    num_layers, full, sliding, window = _layer_split(config, layers)
    if num_layers is None and kv_heads is None and head_dim is None:
        return None
    return _arch(num_layers, kv_heads, head_dim, full, sliding, window, mla_dim)


def arch_from_metadata(meta: dict, config_arch: ModelArch | None = None) -> ModelArch | None:
    """Recipe metadata num_layers / num_kv_heads / head_dim, each winning over config_arch."""
    layers, kv_heads, head_dim = (_positive_int((meta or {}).get(key))
                                  for key in ("num_layers", "num_kv_heads", "head_dim"))
    if config_arch is None:
        return _arch(layers, kv_heads, head_dim) if layers or kv_heads or head_dim else None
    if layers and layers != config_arch.num_layers:  # the config's layer layout no longer applies
        config_arch = _arch(layers, config_arch.num_kv_heads, config_arch.head_dim,
                            mla_dim=config_arch.mla_dim)
    return replace(config_arch, num_kv_heads=kv_heads or config_arch.num_kv_heads,
                   head_dim=head_dim or config_arch.head_dim)


# -- KV cache and fit

def _kv_rates(arch: ModelArch, dtype_bytes: float) -> tuple[float, float]:
    """Bytes per token summed over the full-KV layers, and over the sliding-window layers."""
    per_layer = dtype_bytes * (arch.mla_dim or 2 * arch.num_kv_heads * arch.head_dim)
    full_layers = arch.num_layers if arch.kv_layers is None else arch.kv_layers
    return per_layer * full_layers, per_layer * arch.sliding_layers


def _kv_bytes(arch: ModelArch, dtype_bytes: float, context: int) -> float:
    full_rate, sliding_rate = _kv_rates(arch, dtype_bytes)
    return full_rate * context + sliding_rate * min(context, arch.sliding_window or context)


def kv_bytes_per_token(arch: ModelArch, kv_dtype: str, context: int) -> float:
    """Average KV bytes per token over `context` tokens; raises ValueError on missing inputs."""
    dtype_bytes = bytes_per_param(resolve_kv_dtype(kv_dtype))
    if arch is None or arch.missing or dtype_bytes is None or not _positive_int(context):
        raise ValueError(f"cannot size the KV cache: {arch=}, {kv_dtype=}, {context=}")
    return _kv_bytes(arch, dtype_bytes, context) / context


def _max_context_tokens(arch: ModelArch, dtype_bytes: float, tp: int, available: float):
    """Longest context whose KV fits in `available` bytes per GPU; None when KV stops growing."""
    full_rate, sliding_rate = (rate / tp for rate in _kv_rates(arch, dtype_bytes))
    growth, window = full_rate + sliding_rate, arch.sliding_window or math.inf
    if available <= 0:
        return 0
    if growth and available <= growth * window:
        return math.floor(available / growth)
    # Past the window only the full-KV layers grow.
    return math.floor((available - sliding_rate * window) / full_rate) if full_rate else None


@dataclass(frozen=True)
class VramEstimate:
    model_dtype: str | None
    params: int | None
    kv_dtype: str
    arch: ModelArch | None
    weights_bytes: float | None
    kv_bytes: float | None  # for max_model_len tokens, all GPUs together
    max_model_len: int | None
    tp: int
    per_gpu_bytes: float | None
    gpu_mem: float
    usable_bytes: float
    available_kv_bytes: float | None  # per GPU
    max_context_tokens: int | None  # None with nothing missing: KV never outgrows the budget
    multiplier: float | None
    verdict: str
    missing: tuple[str, ...]
    weights_source: str | None


def estimate_vram(*, params, model_dtype, kv_dtype, arch, max_model_len, tp=1, gpu_mem=0.9,
                  weights_bytes=None) -> VramEstimate:
    params, kv_dtype = parse_param_count(params), resolve_kv_dtype(kv_dtype)
    max_model_len, tp, gpu_mem = _positive_int(max_model_len), _positive_int(tp) or 1, float(gpu_mem or 0.9)
    missing = []
    weights_source = FROM_DISK if weights_bytes else None
    model_dtype_bytes = bytes_per_param(model_dtype)
    if not weights_bytes and params and model_dtype_bytes:
        weights_bytes, weights_source = params * model_dtype_bytes, FROM_PARAMS
    elif not weights_bytes:
        weights_bytes = None
        missing += [name for name, known in (("model_params", params), ("model_dtype", model_dtype_bytes))
                    if not known]
    kv_dtype_bytes = bytes_per_param(kv_dtype)
    if kv_dtype_bytes is None:
        missing.append("kv_dtype")
    missing += arch.missing if arch else ("num_layers", "num_kv_heads", "head_dim")
    if max_model_len is None:
        missing.append("max_model_len")
    kv_rate_known = kv_dtype_bytes is not None and arch is not None and not arch.missing
    kv_bytes = _kv_bytes(arch, kv_dtype_bytes, max_model_len) if kv_rate_known and max_model_len else None
    usable = SPARK_GPU_GB * GIB * gpu_mem
    per_gpu = (weights_bytes + kv_bytes) / tp if weights_bytes is not None and kv_bytes is not None else None
    # Exact bytes, no intermediate rounding: the golden 30B nvfp4 example gives 1,557,583 tokens this
    # way (subtracting the printed 96.8 - 19.56 GB figures instead would give 1,557,538).
    available = usable - weights_bytes / tp if weights_bytes is not None else None
    max_tokens = (_max_context_tokens(arch, kv_dtype_bytes, tp, available)
                  if kv_rate_known and available is not None else None)
    multiplier = max_tokens / max_model_len if max_tokens is not None and max_model_len else None
    verdict = UNKNOWN if per_gpu is None else YES if per_gpu <= usable else NO
    return VramEstimate(model_dtype, params, kv_dtype, arch, weights_bytes, kv_bytes, max_model_len, tp,
                        per_gpu, gpu_mem, usable, available, max_tokens, multiplier, verdict,
                        tuple(missing), weights_source)


def _gb(value: float | None, digits: int = 2) -> str:
    return "unknown" if value is None else f"{value / GIB:.{digits}f} GB"


def _describe_arch(arch: ModelArch | None) -> str:
    if arch is None:
        return "unknown"
    layers = f"{'unknown' if arch.num_layers is None else arch.num_layers} layers"
    layers += f" ({arch.note})" if arch.note else ""
    if arch.mla_dim:
        return layers
    kv_heads, head_dim = ("unknown" if n is None else n for n in (arch.num_kv_heads, arch.head_dim))
    return f"{layers}, {kv_heads} KV heads, {head_dim} head_dim"


def format_vram(est: VramEstimate) -> str:
    max_model_len = "unknown" if est.max_model_len is None else f"{est.max_model_len:,}"
    utilization = f"{round(est.gpu_mem * 100, 2):g}%"
    if est.max_context_tokens is None:  # with only max_model_len missing, KV never fills the budget
        max_tokens = multiplier = "unbounded" if set(est.missing) <= {"max_model_len"} else "unknown"
    else:
        max_tokens = f"{est.max_context_tokens:,}"
        multiplier = ("unknown" if est.multiplier is None
                      else f"{est.multiplier:.1f}x (vs max_model_len={max_model_len})")
    on_disk = " (on-disk size)" if est.weights_source == FROM_DISK else ""
    fit = f"UNKNOWN (missing: {', '.join(est.missing)})" if est.verdict == UNKNOWN else est.verdict
    lines = [
        "VRAM Estimation:",
        f"  Model dtype:      {est.model_dtype or 'unknown'}",
        f"  Model params:     {'unknown' if est.params is None else f'{est.params:,}'}",
        f"  KV cache dtype:   {est.kv_dtype}",
        f"  Architecture:     {_describe_arch(est.arch)}",
        f"  Model weights:    {_gb(est.weights_bytes)}{on_disk}",
        f"  KV cache:         {_gb(est.kv_bytes)} (max_model_len={max_model_len})",
        f"  Tensor parallel:  {est.tp}",
        f"  Per-GPU total:    {_gb(est.per_gpu_bytes)}",
        f"  DGX Spark fit:    {fit}",
        "",
        "  GPU Memory Budget:",
        f"    gpu_memory_utilization: {utilization}",
        f"    Usable GPU memory:     {_gb(est.usable_bytes, 1)} ({SPARK_GPU_GB} GB x {utilization})",
        f"    Available for KV:      {_gb(est.available_kv_bytes, 1)}",
        f"    Max context tokens:    {max_tokens}",
        f"    Context multiplier:    {multiplier}",
    ]
    if est.missing:
        lines.append(f"  Missing:          {', '.join(est.missing)}")
    return "\n".join(lines)


def vram_to_json(est: VramEstimate) -> dict:
    return {**asdict(est), "missing": list(est.missing)}


# -- local Hugging Face cache

def cached_snapshot_dir(hf_home: Path, repo_id: str, revision: str | None = None) -> Path | None:
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision or "main"
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_cached_config(hf_home: Path, repo_id: str, revision: str | None = None) -> dict | None:
    snapshot = cached_snapshot_dir(hf_home, repo_id, revision)
    return _read_json(snapshot / "config.json") if snapshot else None


def cached_weights_bytes(hf_home: Path, repo_id: str, revision: str | None = None,
                         gguf_quant: str | None = None) -> int | None:
    """On-disk weight size: safetensors index total_size, else the sum of the weight files."""
    snapshot = cached_snapshot_dir(hf_home, repo_id, revision)
    if snapshot is None:
        return None
    if gguf_quant:
        # The quant must stand alone in the path: 'Q4_K' must not pick up 'Q4_K_M' files.
        quant = re.compile(rf"(?<![a-z0-9]){re.escape(gguf_quant.lower())}(?![a-z0-9_])")
        files = [path for path in snapshot.rglob("*.gguf")
                 if quant.search(path.relative_to(snapshot).as_posix().lower())]
    else:
        for index in sorted(snapshot.glob("*.safetensors.index.json")):
            total = _positive_int(((_read_json(index) or {}).get("metadata") or {}).get("total_size"))
            if total:
                return total
        files = list(snapshot.glob("*.safetensors"))
    try:
        return sum(path.stat().st_size for path in files) or None
    except OSError:  # a snapshot link whose blob was never downloaded
        return None


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not or cannot be reached; decided in about a second."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    cached = getattr(hub_offline, "answer", None)
    if cached is None:
        import socket
        import threading
        from urllib.parse import urlsplit

        endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        reached = []

        def probe():  # getaddrinfo has no timeout of its own, hence the thread
            try:
                socket.create_connection((endpoint.hostname, port), timeout=1.0).close()
                reached.append(True)
            except OSError:
                pass

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(1.5)
        cached = hub_offline.answer = not reached
    return cached


def hub_config(repo_id: str, revision: str | None) -> dict | None:
    """config.json from the Hub, only when it is reachable; None on any failure."""
    if hub_offline():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(repo_id, "config.json", revision=revision)))
    except Exception:  # a gated, missing or renamed repo only leaves the estimate unknown
        return None


def recipe_vram(recipe: Recipe, overrides: dict | None = None, *, hf_home: Path,
                auto_detect: bool = True) -> VramEstimate:
    """The estimate for a recipe as it would launch: metadata first, then the local cache's
    config.json, then the Hub (online only); on-disk weight sizes win over params x dtype."""
    values = recipe_values(recipe, overrides)
    meta = recipe.metadata
    config = weights = None
    if auto_detect:
        config = read_cached_config(hf_home, recipe.model_repo, recipe.model_revision)
        weights = cached_weights_bytes(hf_home, recipe.model_repo, recipe.model_revision, recipe.gguf_quant)
        has_arch = all(meta.get(k) for k in ("num_layers", "num_kv_heads", "head_dim"))
        if config is None and not has_arch:
            config = hub_config(recipe.model_repo, recipe.model_revision)
    arch = arch_from_metadata(meta, arch_from_config(config) if config else None)
    gpu_mem = values.get("gpu_memory_utilization")
    if not (isinstance(gpu_mem, (int, float)) and 0 < gpu_mem <= 1):
        gpu_mem = 0.9
    max_len = values.get("max_model_len") or values.get("ctx_size") or (config or {}).get("max_position_embeddings")
    tp = _positive_int(values.get("tensor_parallel")) or 1
    return estimate_vram(params=meta.get("model_params"), model_dtype=meta.get("model_dtype") or recipe.gguf_quant,
                         kv_dtype=resolve_kv_dtype(meta.get("kv_dtype"), values.get("kv_cache_dtype")),
                         arch=arch, max_model_len=max_len, tp=tp, gpu_mem=gpu_mem, weights_bytes=weights)



# ---------------------------------------------------------------------------
# 6. Hosts and SSH
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 7. Clusters
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 8. Launch plan
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 9. Execution: preflight, launch, readiness, stop, logs, status
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 10. CLI
# ---------------------------------------------------------------------------

def print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(bold("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_list(args) -> int:
    summaries = summarize(catalog(include_hidden=args.all))
    if args.runtime:
        summaries = [s for s in summaries if s.runtime.startswith(args.runtime)]
    summaries = search_summaries(summaries, getattr(args, "query", None))
    if args.json:
        print(json.dumps([s.__dict__ for s in summaries], indent=2))
        return 0
    if not summaries:
        print("No recipes match." if getattr(args, "query", None) else "No recipes found.")
        return 0
    rows = [[s.qualified, s.runtime, nodes_text(s.min_nodes, s.max_nodes), s.model, s.description]
            for s in summaries]
    print_table(rows, ["NAME", "RUNTIME", "NODES", "MODEL", "DESCRIPTION"])
    return 0


def recipe_as_dict(recipe: Recipe) -> dict:
    return {
        "name": recipe.name, "path": str(recipe.path), "repository": recipe.source,
        "runtime": recipe.runtime, "model": recipe.model, "model_revision": recipe.model_revision,
        "container": recipe.container, "recipe_version": recipe.recipe_version,
        "min_nodes": recipe.min_nodes, "max_nodes": recipe.max_nodes, "mode": recipe.mode,
        "solo_only": recipe.solo_only, "cluster_only": recipe.cluster_only,
        "description": recipe.description, "metadata": recipe.metadata, "defaults": recipe.defaults,
        "env": recipe.env, "command": recipe.command, "mods": recipe.mods,
        "build_args": recipe.build_args, "runtime_config": recipe.runtime_config,
    }


def show_text(recipe: Recipe) -> str:
    lines = [
        f"Name:         {recipe.name}",
        f"Description:  {recipe.description}",
        f"Runtime:      {recipe.runtime.removesuffix('-distributed')}",
        f"Model:        {recipe.model}",
        f"Container:    {recipe.container}",
        f"Nodes:        {nodes_text(recipe.min_nodes, 1 if recipe.solo_only else recipe.max_nodes)}",
        f"Repository:   {recipe.source}",
    ]
    if recipe.defaults:
        lines += ["", "Defaults:"]
        lines += [f"  {k}: {format_value(v)}" for k, v in sorted(recipe.defaults.items())]
    return "\n".join(lines)


def cmd_show(args) -> int:
    recipe = find_recipe(args.recipe, runtime=args.runtime)
    if args.save:
        Path(args.save).write_text(recipe.text)
        print(f"Saved {recipe.name} to {args.save}", file=sys.stderr)
    estimate = None if args.no_vram else recipe_vram(recipe, hf_home=hf_home())
    if args.json:
        shown = recipe_as_dict(recipe)
        if estimate:
            shown["vram"] = vram_to_json(estimate)
        print(json.dumps(shown, indent=2, default=str))
        return 0
    print(show_text(recipe))
    if estimate:
        print("\n" + format_vram(estimate))
    return 0


def cmd_recipe_vram(args) -> int:
    recipe = find_recipe(args.recipe)
    overrides = typed_overrides(args)
    estimate = recipe_vram(recipe, overrides, hf_home=hf_home(args.cache_dir),
                           auto_detect=not args.no_auto_detect)
    print(json.dumps(vram_to_json(estimate), indent=2) if args.json else format_vram(estimate))
    return 0


def cmd_recipe_validate(args) -> int:
    worst = 0
    for name in args.recipes:
        try:
            recipe = find_recipe(name)
        except UsageError as exc:
            print(f"ERROR    {exc}")
            worst = 2
            continue
        errors, warnings = validate_recipe(recipe)
        for message in errors:
            print(f"ERROR    {recipe.name}: {message}")
        for message in warnings:
            print(f"WARNING  {recipe.name}: {message}")
        if errors:
            worst = 2
        elif not warnings:
            print(f"OK       {recipe.name} ({recipe.runtime})")
    return worst


def add_common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # Subcommands must not reset a count given before the command name.
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="more output; -v shows tracebacks, -vv shows every remote command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparkrun",
        description="Launch, watch and stop LLM inference servers on DGX Spark hosts over SSH.")
    parser.add_argument("--version", action="version", version=f"sparkrun {__version__}")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, func, help_text, parent=sub):
        p = parent.add_parser(name, help=help_text, description=help_text)
        add_common(p)
        p.set_defaults(func=func)
        return p

    def catalog_options(p, query=True):
        if query:
            p.add_argument("query", nargs="?", help="words that must all appear (name, model, description)")
        p.add_argument("--all", "-a", action="store_true", help="include hidden registries' recipes")
        p.add_argument("--runtime", help="only recipes of this runtime (vllm, sglang, llama-cpp, ...)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def show_options(p):
        p.add_argument("recipe", help="recipe name, @registry/name, or a path to a YAML file")
        p.add_argument("--save", metavar="PATH", help="also save the recipe's YAML to PATH")
        p.add_argument("--no-vram", action="store_true", help="skip the VRAM estimate")
        p.add_argument("--runtime", help="pick the recipe of this runtime when the name is shared")
        p.add_argument("--all", "-a", action="store_true", help="also look in hidden registries")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    catalog_options(command("list", cmd_list, "List recipes (bundled and registries)."))
    p = command("search", cmd_list, "Search recipes by name, model or description.")
    catalog_options(p, query=False)
    p.add_argument("query", help="words that must all appear")
    show_options(command("show", cmd_show, "Show a recipe."))

    recipe = sub.add_parser("recipe", help="Recipe tools: list, show, search, validate.",
                            description="Recipe tools: list, show, search, validate.")
    add_common(recipe)
    rsub = recipe.add_subparsers(dest="recipe_command", metavar="SUBCOMMAND", required=True)
    catalog_options(command("list", cmd_list, "List recipes.", rsub))
    p = command("search", cmd_list, "Search recipes.", rsub)
    catalog_options(p, query=False)
    p.add_argument("query", help="words that must all appear")
    show_options(command("show", cmd_show, "Show a recipe.", rsub))
    p = command("validate", cmd_recipe_validate, "Check recipes: fields, placeholders, unknown keys.", rsub)
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="names or paths")
    p = command("vram", cmd_recipe_vram, "Estimate whether a recipe fits a DGX Spark's GPU memory.", rsub)
    p.add_argument("recipe", help="recipe name, @registry/name, or a path")
    p.add_argument("--tp", type=int, help="tensor parallel size (GPUs, one per Spark)")
    p.add_argument("--max-model-len", type=int, help="context length to budget for")
    p.add_argument("--gpu-mem", type=float, help="gpu_memory_utilization, a fraction in (0, 1]")
    p.add_argument("--cache-dir", help="Hugging Face cache root (default: $HF_HOME or ~/.cache/huggingface)")
    p.add_argument("--no-auto-detect", action="store_true",
                   help="use recipe metadata only: no config.json from the cache or the Hub")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except SparkrunError as exc:
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
