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
    9. Execution: preflight, launch, readiness, distribution, stop, logs, status
    10. CLI

The occasional commands are plain modules in commands/, imported only when they run:
benchmark.py (benchmark and tune) and lab_setup.py (setup and shell completion).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import threading
import time
from pathlib import Path


class LazyModule:
    """A standard-library module imported on first use: `list`, `show` and completion start no
    process and copy no file, and these imports cost as much as the rest of start-up."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str):
        import importlib

        module = importlib.import_module(self.name)
        globals()[self.name] = module  # later uses go straight to the module
        return getattr(module, attribute)


subprocess = LazyModule("subprocess")
shutil = LazyModule("shutil")


class Record:
    """Base of the plain data classes below. `dataclasses` would do the same, but it costs about
    25 ms of start-up: it imports `inspect` and compiles an `__init__` for every class.

    A subclass's annotations are its fields, in order; a class attribute is that field's default,
    and a list or dict default is copied for each instance. Instances are immutable unless the
    class is declared `Record, mutable=True`. Equality is identity."""

    _fields: tuple[str, ...] = ()
    _defaults: dict = {}
    _mutable = False

    def __init_subclass__(cls, mutable: bool = False):
        super().__init_subclass__()
        cls._fields = tuple(cls.__dict__.get("__annotations__", ()))
        cls._defaults = {name: cls.__dict__[name] for name in cls._fields if name in cls.__dict__}
        cls._mutable = mutable

    def __init__(self, *args, **kwargs):
        cls = type(self)
        if len(args) > len(cls._fields):
            raise TypeError(f"{cls.__name__}() takes {len(cls._fields)} fields, got {len(args)}")
        values = dict(zip(cls._fields, args))
        for name, value in kwargs.items():
            if name not in cls._fields or name in values:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated field {name!r}")
            values[name] = value
        for name in cls._fields:
            if name not in values:
                if name not in cls._defaults:
                    raise TypeError(f"{cls.__name__}() is missing field {name!r}")
                default = cls._defaults[name]
                values[name] = default.copy() if isinstance(default, (list, dict)) else default
        self.__dict__.update(values)

    def __setattr__(self, name: str, value) -> None:
        if not self._mutable:
            raise AttributeError(f"{type(self).__name__} is immutable; use .replace({name}=...)")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"

    def replace(self, **changes):
        """A copy with some fields changed."""
        return type(self)(**{**self.as_dict(), **changes})

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._fields}


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal or ssh session), raised where Ctrl+C raises
    KeyboardInterrupt, so that every signal that ends a run takes the same way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_on_signals() -> None:
    import signal

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def signal_exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as shells report it: 130 for Ctrl+C, 143 SIGTERM, 129 SIGHUP."""
    return 128 + getattr(interrupt, "signum", 2)


class Detached(KeyboardInterrupt):
    """A signal once every container of a launch had started: the job keeps running."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(interrupt)
        self.signum = getattr(interrupt, "signum", 2)


# Control characters other than tab and newline: escape sequences in a registry's text could
# clear the screen, move the cursor or forge links.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
UNPRINTABLE = re.compile(r"(?!\x1b\[[01]m)[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # sparkrun's own bold may pass


class PrintableStream:
    """sys.stdout and sys.stderr while a command runs (main() installs them): all that sparkrun
    prints, recipe and registry text included, reaches the terminal without control characters.
    Newlines, tabs, bold (see bold()) and a carriage return that starts a write (a progress
    line redrawn in place) pass."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        lead = "\r" if text.startswith("\r") else ""
        return self.stream.write(lead + UNPRINTABLE.sub("", text[len(lead):]))

    def __getattr__(self, name):
        return getattr(self.stream, name)


def warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


SECRET_VALUES: set[str] = set()  # every secret this process handles; shown only as ***


def mask(text: str) -> str:
    for value in SECRET_VALUES:
        text = text.replace(value, "***")
    return text


def use_color(stream=sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if use_color() else text


# ---------------------------------------------------------------------------
# 2. Config and paths
# ---------------------------------------------------------------------------

def _user_dir(explicit_var: str, xdg_var: str, fallback: str) -> Path:
    explicit = os.environ.get(explicit_var)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(xdg_var) or os.path.join(os.path.expanduser("~"), fallback)) / "sparkrun"


def config_dir() -> Path:
    return _user_dir("SPARKRUN_CONFIG_DIR", "XDG_CONFIG_HOME", ".config")


def cache_dir() -> Path:
    return _user_dir("SPARKRUN_CACHE_DIR", "XDG_CACHE_HOME", ".cache")


def hf_home(cache_dir_option: str | None = None) -> Path:
    """The Hugging Face cache root (the folder holding `hub/`): --cache-dir > HF_HOME > default."""
    chosen = cache_dir_option or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(os.path.expanduser(chosen))


def resource_dir(name: str) -> Path:
    """`recipes`, `runtimes` or `commands`: beside this file in a checkout, `sparkrun_<name>` when installed."""
    checkout = HERE / name
    return checkout if checkout.is_dir() else HERE / f"sparkrun_{name}"


class FolderError(SparkrunError):
    """A folder sparkrun keeps its files in cannot be written (read-only, full, no permission)."""

    def __init__(self, folder: Path, exc: OSError):
        super().__init__(f"cannot write in {folder}: {exc.strerror or exc}; free space or fix its permissions, "
                         "or point SPARKRUN_CONFIG_DIR / SPARKRUN_CACHE_DIR elsewhere")


def make_dir(folder: Path, mode: int = 0o777) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as exc:
        raise FolderError(folder, exc) from None
    return folder


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half of it; on a
    failure (read-only or full folder) no temporary file is left behind."""
    import tempfile

    make_dir(path.parent)
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with open(handle, "w") as stream:
            stream.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise FolderError(path.parent, exc) from None


class ConfigLock:
    """Serializes read-modify-write of one file between sparkrun processes (and the threads of
    one): whoever holds it reads, changes and replaces the file whole. Re-entrant."""

    held: dict = {}  # lock path -> [open file, depth], in this process
    guard = threading.RLock()

    def __init__(self, path: Path):
        self.path = path.with_name(f".{path.name}.lock")

    def __enter__(self):
        import fcntl

        self.guard.acquire()
        entry = self.held.get(self.path)
        if entry:
            entry[1] += 1
            return self
        make_dir(self.path.parent)
        try:
            handle = open(self.path, "a")
        except OSError as exc:
            self.guard.release()
            raise FolderError(self.path.parent, exc) from None
        fcntl.flock(handle, fcntl.LOCK_EX)
        self.held[self.path] = [handle, 1]
        return self

    def __exit__(self, *exc):
        entry = self.held[self.path]
        entry[1] -= 1
        if not entry[1]:
            del self.held[self.path]
            entry[0].close()
        self.guard.release()


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
    "entrypoint": (str,),  # the container's entrypoint; "" clears the image's
    # Present in version "1" (eugr) recipes.
    "name": (str,),
    "description": (str,),
}
MODES = ("auto", "solo", "cluster")
PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
V1_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `${VAR}` or `${VAR:-default}` in a recipe's env values: this machine's environment.
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A branch or tag name, a pull-request ref (refs/pr/1) or a commit hash.
REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
# Characters that could end a word, quote or start a substitution when a CLI value is pasted
# into a recipe command (a space would add an engine flag).
SHELL_UNSAFE = re.compile(r"[;&|$`<>\\'\"\s]")

TYPED_FLAGS = {  # CLI flag destination -> recipe default it overrides
    "port": "port",
    "tp": "tensor_parallel",
    "gpu_mem": "gpu_memory_utilization",
    "max_model_len": "max_model_len",
}


class Recipe(Record, mutable=True):
    name: str  # the file stem: what launches are labelled with
    path: Path
    source: str  # "Local" for bundled or a file path, else the registry name
    declared_name: str = ""  # the recipe's own `name:` field, when it has one
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
    metadata: dict = {}
    defaults: dict = {}
    env: dict = {}
    command: str = ""
    runtime_config: dict = {}
    benchmark: dict = {}
    mods: list = []
    build_args: list = []
    pre_exec: list = []
    post_exec: list = []
    entrypoint: str | None = None  # None: decided from the image
    unknown_keys: tuple = ()
    text: str = ""

    @property
    def runtime(self) -> str:
        return resolve_runtime(self)

    @property
    def display_name(self) -> str:
        """What `show` calls the recipe: its `name:` field, else the file stem; both find it."""
        return self.declared_name or self.name

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
        """The entries; a file that is not what save() wrote counts as empty (and is rewritten)."""
        if self.entries is None:
            try:
                entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                entries = None
            well_formed = isinstance(entries, dict) and all(
                isinstance(e, dict) and isinstance(e.get("stamp"), str) and "data" in e for e in entries.values())
            self.entries = entries if well_formed else {}
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
            except FolderError:
                pass  # a read-only or full cache only costs speed
            self.dirty = False


YAML_CACHE = ParsedYamlCache()


MAX_YAML_BYTES = 1 << 20  # real recipes, manifests and profiles are a few KiB
MAX_YAML_DEPTH = 32  # levels of nesting
MAX_YAML_NODES = 100_000  # values once aliases are expanded: an alias bomb stops here


def read_text_file(path: Path, what: str = "YAML file", limit: int = MAX_YAML_BYTES) -> str:
    """A small UTF-8 text file; anything else (too big, not text, unreadable) is a one-line
    error naming the file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise RecipeError(str(path), f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise RecipeError(str(path), f"larger than {limit // 1024} KiB; not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), f"not UTF-8 text (byte {exc.start}); not a {what}") from None


def read_yaml_file(path: Path) -> tuple[str, object]:
    """(text, parsed data) of a YAML file, through the parsed-YAML cache. Call
    YAML_CACHE.save() once a command has read what it needs."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise RecipeError(str(path), f"cannot read: {exc.strerror}") from None
    stamp = f"{stat.st_mtime_ns}:{stat.st_size}"
    data = YAML_CACHE.get(path, stamp)
    text = read_text_file(path)
    if data is None:
        data = parse_yaml(text, str(path))
        YAML_CACHE.put(path, stamp, data)
    return text, data


def load_recipe(path: Path, source: str = "Local") -> Recipe:
    """Read and validate one recipe file; errors name the file and the field."""
    text, data = read_yaml_file(path)
    return recipe_from_mapping(data, Path(path), source, text)


def bounded_yaml_loader():
    """yaml.SafeLoader that refuses documents nested deeper than MAX_YAML_DEPTH or expanding
    (aliases counted as copies) to more than MAX_YAML_NODES values; made once."""
    if hasattr(bounded_yaml_loader, "made"):
        return bounded_yaml_loader.made
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream, where: str):
            super().__init__(stream)
            self.where, self.depth, self.expanded, self.weights = where, 0, 0, {}

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                self.count(self.weights.get(event.anchor, 1))
                return super().compose_node(parent, index)
            before = self.expanded
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise RecipeError(self.where, f"nested deeper than {MAX_YAML_DEPTH} levels")
            self.count(1)
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if event.anchor is not None:
                self.weights[event.anchor] = self.expanded - before
            return node

        def count(self, nodes: int) -> None:
            self.expanded += nodes
            if self.expanded > MAX_YAML_NODES:
                raise RecipeError(self.where, f"expands to more than {MAX_YAML_NODES:,} values (YAML aliases?)")

    bounded_yaml_loader.made = Loader
    return Loader


def parse_yaml(text: str, where: str):
    import yaml

    loader = None
    try:
        loader = bounded_yaml_loader()(text, where)  # a str with unprintable characters fails here
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(where, f"malformed YAML{line}: {problem}") from None
    finally:
        if loader:
            loader.dispose()


def recipe_from_mapping(data, path: Path, source: str, text: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(str(path), "a recipe must be a YAML mapping of fields")
    recipe = Recipe(name=path.stem, path=path, source=source, text=text)
    unknown = {}
    for key, value in data.items():
        if key not in RECIPE_FIELDS:
            unknown[str(key)] = value
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
    recipe.runtime_config = {**unknown, **recipe.runtime_config}  # an explicit runtime_config value wins
    for key in ("mods", "build_args"):  # eugr's fields, also read from runtime_config
        if not getattr(recipe, key) and isinstance(recipe.runtime_config.get(key), list):
            setattr(recipe, key, list(recipe.runtime_config[key]))
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
        recipe.declared_name = value.strip()
    elif key == "runtime_config":
        recipe.runtime_config.update(value)
    else:
        setattr(recipe, key, value)


def _check_recipe(recipe: Recipe) -> None:
    where = str(recipe.path)
    if not recipe.model:
        raise RecipeError(where, "field 'model' is required")
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
    if not recipe.command and default_command(recipe.runtime) is None:
        raise RecipeError(where, f"field 'command' is required: runtime {recipe.runtime} has no default serve command")
    for key, value in recipe.env.items():
        problem = env_problem(key, value)
        if problem:
            raise RecipeError(where, f"field 'env': {problem}")
    for key in ("pre_exec", "post_exec", "mods", "build_args"):
        for item in getattr(recipe, key):
            if not isinstance(item, str):
                raise RecipeError(where, f"field '{key}': every item must be a string, not {item!r}")
    if recipe.model_revision is not None:
        problem = revision_problem(recipe.model_revision)
        if problem:
            raise RecipeError(where, f"field 'model_revision': {problem}")
    for key, value in recipe.defaults.items():
        problem = typed_value_problem(key, value)
        if problem:
            raise RecipeError(where, f"field 'defaults': {problem}")


def env_problem(key: str, value) -> str | None:
    """Why an env entry cannot be passed to a container; None when it can."""
    if not ENV_KEY.fullmatch(key):
        return f"name {key!r} must be letters, digits and '_', not starting with a digit"
    if isinstance(value, (dict, list)):
        return f"{key} must be a single value, not {type(value).__name__}"
    if value is not None and not one_line_value(format_value(value)):
        return f"the value of {key} holds a newline or another control character"
    return None


def one_line_value(text: str) -> bool:
    """No newline or other control character (a tab is fine): docker's env file is one line per variable."""
    return "\n" not in text and not CONTROL_CHARS.search(text)


def revision_problem(revision: str) -> str | None:
    """Why `revision` is no branch, tag or commit name; None when it is one."""
    if (not REVISION.fullmatch(revision) or ".." in revision or len(revision) > 255
            or revision.endswith((".lock", "."))):
        return (f"{revision!r} is not a branch, tag or commit hash (letters, digits, '.', '_', '-', "
                "'/' between names; no '..')")
    return None


PORT_KEYS = ("port",)
COUNT_KEYS = ("tensor_parallel", "pipeline_parallel")


def typed_value_problem(key: str, value) -> str | None:
    """Why a template value cannot be used for `key` (a port, a count, a fraction); None if fine."""
    whole = value if isinstance(value, int) and not isinstance(value, bool) else (
        int(value) if isinstance(value, str) and value.strip().isdigit() else None)
    if key in PORT_KEYS and (whole is None or not 1 <= whole <= 65535):
        return f"{key} must be a port number from 1 to 65535, not {value!r}"
    if key in COUNT_KEYS and (whole is None or whole < 1):
        return f"{key} must be a whole number of at least 1, not {value!r}"
    if key == "gpu_memory_utilization" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                            or not math.isfinite(value)):
        return f"{key} must be a number, not {value!r}"
    return None


def _plugin_runtime_names() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="sparkrun.runtimes")}


def resolve_runtime(recipe: Recipe) -> str:
    """The runtime that will launch this recipe (see the runtime rules in README)."""
    declared = recipe.declared_runtime
    declared = RUNTIME_ALIASES.get(declared, declared) if declared else None
    if recipe.recipe_version == "1" or (declared in (None, "vllm") and recipe.build_args) or (
            declared is None and recipe.mods):
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
    return bool(re.search(r"--distributed-executor-backend(?:[\s=]|\\\n)+ray\b", recipe.command))


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
        raise UsageError(f"{what}: value {value!r} holds a space, a quote or a shell metacharacter, which "
                         "would change the command; not accepted")


def typed_overrides(args) -> dict:
    """Overrides from the typed flags (--port, --tp, --gpu-mem, --max-model-len)."""
    values = {}
    for dest, key in TYPED_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None and value != "auto":
            problem = typed_value_problem(key, value)
            if problem:
                raise UsageError(f"--{dest.replace('_', '-')}: {problem}")
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


def default_command(runtime: str) -> tuple[str, tuple] | None:
    """A runtime's serve command for recipes without `command`: (base, ((default key, flag), ...)),
    or None when the runtime has none."""
    return getattr(load_runtime(runtime), "DEFAULT_COMMAND", None)


def command_template(recipe: Recipe, values: dict) -> str:
    """The recipe's command, else its runtime's default: the base command and one flag per
    default that has a value (model, host, port, parallelism, memory, context, served name)."""
    if recipe.command:
        return recipe.command
    base, flags = default_command(recipe.runtime)
    return " ".join([base, *(f"{flag} {{{key}}}" for key, flag in flags if values.get(key) is not None)])


def command_placeholders(recipe: Recipe, values: dict) -> list[str]:
    pattern = V1_TOKEN if recipe.recipe_version == "1" else PLACEHOLDER
    return [m.group(1) for m in pattern.finditer(command_template(recipe, values)) if m.group(1)]


def render_command(recipe: Recipe, values: dict) -> str:
    """Fill `{key}` placeholders. Version "1" commands also unescape `{{` and `}}`;
    version "2" commands keep every other brace (raw JSON) untouched."""
    missing = sorted({k for k in command_placeholders(recipe, values) if k not in values})
    if missing:
        raise UsageError(f"recipe {recipe.name}: no value for {', '.join('{' + k + '}' for k in missing)}; "
                         f"add it to defaults or pass -o {missing[0]}=...")

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key is None:
            return match.group(0)[0]
        return format_value(values[key])

    pattern = V1_TOKEN if recipe.recipe_version == "1" else PLACEHOLDER
    return pattern.sub(fill, command_template(recipe, values))


def one_line(command: str) -> str:
    """The command as one line: backslash-newline continuations joined."""
    return " ".join(re.sub(r"\\\s*\n", " ", command).split())


def validate_recipe(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(errors, warnings) that do not stop a recipe from loading."""
    errors, warnings = [], []
    values = recipe_values(recipe)
    missing = sorted({k for k in command_placeholders(recipe, values) if k not in values})
    if missing:
        errors.append(f"command uses {', '.join('{' + k + '}' for k in missing)} with no default value")
    for key in recipe.unknown_keys:
        warnings.append(f"unknown field '{key}' kept in runtime_config")
    gpu_mem = recipe.defaults.get("gpu_memory_utilization")
    if gpu_mem is not None and not (isinstance(gpu_mem, (int, float)) and 0 < gpu_mem <= 1):
        warnings.append(f"defaults.gpu_memory_utilization is {gpu_mem!r}, not a fraction in (0, 1]; "
                        "the VRAM estimate ignores it")
    warnings += metadata_problems(recipe.metadata)
    if recipe.runtime == "llama-cpp" and recipe.min_nodes > 1:
        warnings.append("llama-cpp multi-node (rpc-server) is experimental")
    return errors, warnings


def metadata_problems(meta: dict) -> list[str]:
    """The VRAM hints in metadata that the estimate cannot use."""
    problems = []
    if meta.get("model_params") is not None and parse_param_count(meta["model_params"]) is None:
        problems.append(f"metadata.model_params {meta['model_params']!r} is not a parameter count "
                        "(like 30B, 1.7B, 235M); the VRAM estimate ignores it")
    for key in ("model_dtype", "kv_dtype"):
        value = meta.get(key)
        if value is not None and str(value).lower() != "auto" and bytes_per_param(value) is None:
            problems.append(f"metadata.{key} {value!r} is not a known dtype or quantization; "
                            "the VRAM estimate ignores it")
    return problems


DATA_PARALLEL_FLAG = re.compile(r"(?:--data-parallel-size|-dp)(?:[ =]+)(\d+)(?=\s|$)")


def data_parallel_size(values: dict, command: str = "") -> int:
    """Data-parallel replicas: the recipe's `data_parallel` (or `data_parallel_size`) value, else
    `--data-parallel-size N` / `-dp N` in the rendered command, else 1."""
    for key in ("data_parallel", "data_parallel_size"):
        if values.get(key) not in (None, ""):
            return _whole_number(values, key)
    found = DATA_PARALLEL_FLAG.search(command)
    return max(1, int(found[1])) if found else 1


def _whole_number(values: dict, key: str) -> int:
    try:
        return max(1, int(values.get(key) or 1))
    except (TypeError, ValueError):
        raise UsageError(f"'{key}' must be a whole number, not {values.get(key)!r}") from None


def node_count(recipe: Recipe, values: dict, command: str = "") -> int:
    """Nodes a launch needs: one GPU per Spark, so tensor x pipeline x data parallel."""
    try:
        gpus = (_whole_number(values, "tensor_parallel") * _whole_number(values, "pipeline_parallel")
                * data_parallel_size(values, command))
    except UsageError as error:
        raise UsageError(f"recipe {recipe.name}: {error}") from None
    return max(recipe.min_nodes, gpus)


# ---------------------------------------------------------------------------
# 4. Catalog: bundled recipes, registries, lookup
# ---------------------------------------------------------------------------

class RecipeRef(Record):
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


# Registries: git repositories of recipes, cloned shallow and sparse under cache_dir()/registries.
# registries.yaml holds `registries:` (one mapping per registry: name, url, description, folders,
# visible, enabled, clone, updated) and `pending:` (default sources not fetched yet).

MANIFEST = ".sparkrun/registry.yaml"
FOLDER_KEYS = ("recipes", "tuning", "benchmarks", "mods")
EUGR_REGISTRY = "eugr"
DEFAULT_REGISTRIES = (
    {"url": "https://github.com/spark-arena/recipe-registry.git"},
    {"url": "https://github.com/eugr/spark-vllm-docker.git", "name": EUGR_REGISTRY, "path": "recipes",
     "mods": "mods"},
)
REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CLONE_NAME = REGISTRY_NAME  # a clone's folder under registries_root(): never '.', '..' or '.add-*'
REGISTRY_ENV_DEFAULT = ("HF_TOKEN",)  # what registries' recipes may read with ${VAR}, unless configured
SOURCE_OPTION = re.compile(r"(name|path|mods)=(.+)")
GIT_TIMEOUT = 120  # seconds, for every git call
# git's stderr lines that never say what went wrong.
GIT_NOISE = ("warning:", "hint:", "Please make sure you have", "and the repository exists",
             "fatal: Could not read from remote repository")
DEFAULTS_UNAVAILABLE = ("could not fetch the default registries ({}); using the bundled recipes "
                        "('sparkrun registry update' retries)")
REGISTRIES_HEADER = "# sparkrun recipe registries; change with 'sparkrun registry ...'\n"


class GitError(SparkrunError):
    """A git command failed; the message is git's last meaningful stderr line."""


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git with a timeout and never a prompt (no terminal, askpass or credential helper)."""
    import signal

    ssh = os.environ.get("GIT_SSH_COMMAND", "ssh") + " -o BatchMode=yes -o ConnectTimeout=15"
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="", SSH_ASKPASS="", GIT_SSH_COMMAND=ssh)
    argv = ["git", "-c", "credential.helper=", "-c", "core.askPass=", *args]
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    except FileNotFoundError:
        raise SparkrunError("git is not installed; registries need it") from None
    try:
        out, err = proc.communicate(timeout=GIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise GitError(f"git {args[0]} timed out after {GIT_TIMEOUT} s") from None
    if proc.returncode:
        lines = [s.strip() for s in err.splitlines() if s.strip() and not s.strip().startswith(GIT_NOISE)]
        raise GitError(lines[-1].removeprefix("fatal: ") if lines else f"git {args[0]} failed ({proc.returncode})")
    return out


def registries_file() -> Path:
    return config_dir() / "registries.yaml"


def registries_root() -> Path:
    return cache_dir() / "registries"


def default_sources() -> list[dict]:
    """SPARKRUN_DEFAULT_REGISTRIES: comma-separated `url` or `url#name=N,path=P,mods=M` ("" = none)."""
    text = os.environ.get("SPARKRUN_DEFAULT_REGISTRIES")
    if text is None:
        return [dict(s) for s in DEFAULT_REGISTRIES]
    sources = []
    for token in filter(None, (t.strip() for t in text.replace("#", ",").split(","))):
        option = SOURCE_OPTION.fullmatch(token)
        if option and sources:
            sources[-1][option[1]] = option[2]
        else:
            sources.append({"url": token})
    return sources


def load_registry_config() -> dict:
    """registries.yaml as {"registries": [...], "pending": [...], "allow_env": [...]}; the first
    use fetches the defaults. Folders left by a killed `registry add` are removed first."""
    remove_stale_adds()
    path = registries_file()
    if not path.exists() and not default_sources():
        return check_registry_config({}, path)
    if not path.exists():
        with ConfigLock(path):
            if not path.exists():
                return first_use()
    _, data = read_yaml_file(path)
    YAML_CACHE.save()
    return check_registry_config(data, path)


def check_registry_config(data, path: Path) -> dict:
    """registries.yaml's content as the rest of sparkrun uses it; a wrong shape is a one-line
    error naming the file and what is wrong."""
    def bad(what: str):
        raise UsageError(f"{path}: {what}; fix the file, or remove it to start again from the default registries")

    data = {} if data is None else data
    if not isinstance(data, dict):
        bad("expected a mapping with 'registries:'")
    config = {}
    for key in ("registries", "pending"):
        items = data.get(key) or []
        if not isinstance(items, list) or not all(isinstance(e, dict) for e in items):
            bad(f"'{key}' must be a list of mappings")
        config[key] = [dict(e) for e in items]
    for entry in config["registries"]:
        name = entry.get("name")
        if not isinstance(name, str) or not REGISTRY_NAME.fullmatch(name):
            bad(f"registry name {name!r} must be letters, digits, '.', '_' or '-'")
        if not isinstance(entry.get("url"), str):
            bad(f"registry '{name}' needs a 'url'")
        if not isinstance(entry.get("clone"), str) or not CLONE_NAME.fullmatch(entry["clone"]):
            bad(f"registry '{name}': 'clone' must be a plain folder name, not {entry.get('clone')!r}")
        for key in FOLDER_KEYS:
            if key in entry and folder_problem(entry[key]):
                bad(f"registry '{name}': '{key}' must name a folder inside the repository")
        for key in ("enabled", "visible"):
            if not isinstance(entry.get(key, True), bool):
                bad(f"registry '{name}': '{key}' must be true or false")
    if not all(isinstance(s.get("url"), str) for s in config["pending"]):
        bad("every entry of 'pending' needs a 'url'")
    allow = data.get("allow_env", list(REGISTRY_ENV_DEFAULT))
    if not isinstance(allow, list) or not all(isinstance(n, str) and ENV_KEY.fullmatch(n) for n in allow):
        bad("'allow_env' must be a list of environment variable names")
    config["allow_env"] = allow
    return config


def registry_allowed_env() -> set[str]:
    """Variables of this machine that registries' recipes may read (`allow_env` in registries.yaml)."""
    if not registries_file().exists():
        return set(REGISTRY_ENV_DEFAULT)
    return set(load_registry_config()["allow_env"])


def save_registry_config(config: dict) -> None:
    import yaml

    body = {"registries": config["registries"]}
    if config.get("pending"):
        body["pending"] = config["pending"]
    body["allow_env"] = config.get("allow_env", list(REGISTRY_ENV_DEFAULT))
    atomic_write(registries_file(), REGISTRIES_HEADER + yaml.safe_dump(body, sort_keys=False))


def change_registry_config(change):
    """Apply change(config) to registries.yaml under its lock and replace the file whole, so that
    concurrent commands never lose each other's changes. Returns what change returns."""
    with ConfigLock(registries_file()):
        config = load_registry_config()
        result = change(config)
        save_registry_config(config)
    return result


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def remove_stale_adds() -> None:
    """Remove the `.add-<pid>-*` folders of `registry add` runs that were killed."""
    root = registries_root()
    for folder in root.glob(".add-*") if root.is_dir() else ():
        pid = folder.name.split("-")[1]
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def first_use() -> dict:
    """Fetch the default registries once; what cannot be fetched stays pending (one warning)."""
    config = {"registries": [], "pending": []}
    sources = default_sources()
    if not sources:
        return config
    failed = []
    for source in sources:
        try:
            add_source(config, source)
        except SparkrunError as exc:
            config["pending"].append(source)
            failed.append(str(exc))
    save_registry_config(config)
    if failed:
        warn(DEFAULTS_UNAVAILABLE.format("; ".join(failed)))
    return config


def registry_named(config: dict, name: str) -> dict:
    for entry in config["registries"]:
        if entry["name"] == name:
            return entry
    raise UsageError(f"no registry named '{name}'; see 'sparkrun registry list'")


def clone_path(name: str) -> Path:
    """A clone's folder: always a child of registries_root(), never that folder or its parent."""
    if not CLONE_NAME.fullmatch(name):
        raise UsageError(f"{registries_file()}: 'clone' must be a plain folder name, not {name!r}")
    return registries_root() / name


def inside(path: Path, root: Path) -> bool:
    """Whether path, symlinks resolved, is root or under it."""
    return path.resolve().is_relative_to(root.resolve())


def registry_folder(entry: dict, key: str) -> Path | None:
    """The registry's `key` folder (recipes, tuning, benchmarks, mods) in its clone, if declared
    and inside the clone (a symlink to elsewhere does not count)."""
    if not entry.get(key):
        return None
    folder = clone_path(entry["clone"]) / entry[key]
    return folder if inside(folder, clone_path(entry["clone"])) else None


def clone_files(entry: dict, key: str, pattern: str, sub: str = "") -> list[Path]:
    """Files matching pattern anywhere under the registry's `key` folder (or its `sub` folder)
    that resolve inside its clone: a registry's symlink to a file elsewhere is never read."""
    folder = registry_folder(entry, key)
    folder = folder / sub if folder and sub else folder
    if folder is None or not folder.is_dir():
        return []
    clone = clone_path(entry["clone"]).resolve()
    return [p for p in sorted(folder.rglob(pattern)) if p.is_file() and p.resolve().is_relative_to(clone)]


def enabled_registries() -> list[dict]:
    return [e for e in load_registry_config()["registries"] if e.get("enabled", True)]


def manifest_entries(clone: Path, url: str) -> list[dict] | None:
    """The registries a checked-out repository declares in its manifest; None without one."""
    where = f"{url}: {MANIFEST}"
    if not (clone / MANIFEST).is_file():
        return None
    if not inside(clone / MANIFEST, clone):
        raise UsageError(f"{where}: a link to a file outside the repository; not read")
    data = parse_yaml(read_text_file(clone / MANIFEST), where)
    declared = data.get("registries") if isinstance(data, dict) else None
    if not isinstance(declared, list) or not declared:
        raise UsageError(f"{where}: expected 'registries:' with a list of registries")
    return [registry_entry(item, url, where) for item in declared]


def registry_entry(item, url: str, where: str) -> dict:
    """One registry's configuration entry, from its manifest item or the --name/--path options."""
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str) or not REGISTRY_NAME.fullmatch(name) or name == "Local":
        raise UsageError(f"{where}: registry name {name!r} must be letters, digits, '.', '_' or '-'")
    entry = {"name": name, "url": url, "description": str(item.get("description") or "")}
    for key in FOLDER_KEYS:
        folder = item.get(key)
        if folder is None and key != "recipes":
            continue
        if folder_problem(folder):
            raise UsageError(f"{where}: registry '{name}': '{key}' must name a folder inside the repository")
        entry[key] = folder.strip("/")
    if not isinstance(item.get("visible", True), bool):
        raise UsageError(f"{where}: registry '{name}': 'visible' must be true or false")
    entry.update(visible=item.get("visible", True), enabled=True)
    return entry


def folder_problem(folder) -> bool:
    """True unless folder names a folder inside a repository."""
    return (not isinstance(folder, str) or not folder.strip("/") or Path(folder).is_absolute()
            or ".." in Path(folder).parts or CONTROL_CHARS.search(folder) is not None)


def sparse_folders(entries: list[dict]) -> list[str]:
    return sorted({".sparkrun"} | {e[k] for e in entries for k in FOLDER_KEYS if e.get(k)})


def clone_name(config: dict, url: str) -> str:
    """The clone folder for `url`: shared by the registries of one repository, else a new one."""
    for entry in config["registries"]:
        if entry["url"] == url:
            return entry["clone"]
    import posixpath

    tail = posixpath.normpath(url.partition("://")[2] or url).rpartition("/")[2].removesuffix(".git")
    base = re.sub(r"^[^A-Za-z0-9]+", "", re.sub(r"[^A-Za-z0-9._-]+", "-", tail)) or "repo"
    taken = {e["clone"] for e in config["registries"]}
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}-{number}"
    return name


def git_clone(url: str, dest: Path) -> None:
    """Shallow, blob-less, sparse clone (git falls back to a full one for plain local paths)."""
    try:
        git("clone", "--quiet", "--depth", "1", "--filter=blob:none", "--sparse", url, str(dest))
    except GitError as exc:
        raise GitError(f"cannot clone {url}: {exc}") from None
    git("sparse-checkout", "set", ".sparkrun", cwd=dest)


def add_source(config: dict, source: dict) -> list[dict]:
    """Clone a repository, read its registries (manifest, or name/path/mods in `source`) and add
    them to config. Nothing changes unless every one of them is valid."""
    import tempfile

    url = source["url"]
    entries = None
    if source.keys() & {"name", "path", "mods"}:
        if not source.get("name") or not source.get("path"):
            raise UsageError("--name and --path go together (the registry's name and recipes folder)")
        item = {"name": source["name"], "recipes": source["path"], "mods": source.get("mods")}
        entries = [registry_entry(item, url, url)]
    make_dir(registries_root())
    tmp = Path(tempfile.mkdtemp(prefix=f".add-{os.getpid()}-", dir=registries_root()))
    try:
        repo = tmp / "repo"
        git_clone(url, repo)
        entries = entries or manifest_entries(repo, url)
        if entries is None:
            raise UsageError(f"{url} has no {MANIFEST}; add it with --name NAME --path FOLDER")
        check_new_names(config, entries)
        sharing = [e for e in config["registries"] if e["url"] == url]
        git("sparse-checkout", "set", *sparse_folders(sharing + entries), cwd=repo)
        for entry in entries:
            if not (repo / entry["recipes"]).is_dir():
                raise UsageError(f"{url}: registry '{entry['name']}': recipes folder "
                                 f"'{entry['recipes']}' not found in the repository")
        name = clone_name(config, url)
        shutil.rmtree(clone_path(name), ignore_errors=True)
        os.replace(repo, clone_path(name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in entries:
        entry.update(clone=name, updated=time.strftime("%Y-%m-%d %H:%M"))
    config["registries"] += entries
    config["pending"] = [p for p in config.get("pending", []) if p["url"] != url]
    return entries


def check_new_names(config: dict, entries: list[dict]) -> None:
    taken = {e["name"] for e in config["registries"]}
    for entry in entries:
        if entry["name"] in taken:
            raise UsageError(f"a registry named '{entry['name']}' already exists; "
                             "remove it first or add this one with another --name")
        taken.add(entry["name"])


def update_clone(config: dict, url: str) -> str:
    """Fetch the newest commit of one repository and move its clone there (a clone that is gone
    is made again). Returns what changed; on a failure the clone is left as it was."""
    group = [e for e in config["registries"] if e["url"] == url]
    clone = clone_path(group[0]["clone"])
    before = "nothing"
    if (clone / ".git").is_dir():
        before = git("rev-parse", "--short", "HEAD", cwd=clone).strip()
        git("fetch", "--quiet", "--depth", "1", "origin", cwd=clone)
        git("reset", "--quiet", "--hard", "FETCH_HEAD", cwd=clone)
    else:
        git_clone(url, clone)
    refresh_entries(clone, url, group)
    git("sparse-checkout", "set", *sparse_folders(group), cwd=clone)
    after = git("rev-parse", "--short", "HEAD", cwd=clone).strip()
    return f"up to date ({after})" if after == before else f"updated {before} -> {after}"


def refresh_entries(clone: Path, url: str, group: list[dict]) -> None:
    """Take the folders, description and visibility of `group` from the updated manifest."""
    try:
        declared = {e["name"]: e for e in manifest_entries(clone, url) or []}
    except UsageError as exc:
        warn(f"{exc}; keeping the previous settings")
        declared = {}
    for entry in group:
        if entry["name"] in declared:
            for key in FOLDER_KEYS:
                entry.pop(key, None)
            entry.update({k: v for k, v in declared[entry["name"]].items() if k != "enabled"})
        entry["updated"] = time.strftime("%Y-%m-%d %H:%M")


def update_registries(names: list[str] | None = None) -> bool:
    """Update the named registries (default: all, and retry pending defaults). One line per
    repository; a failure keeps the last good copy. True when everything succeeded."""
    return change_registry_config(lambda config: update_registry_config(config, names))


def update_registry_config(config: dict, names: list[str] | None) -> bool:
    for name in names or []:
        registry_named(config, name)
    urls = dict.fromkeys(e["url"] for e in config["registries"] if not names or e["name"] in names)
    ok = True
    for url in urls:
        label = ", ".join(e["name"] for e in config["registries"] if e["url"] == url)
        try:
            print(f"{label}: {update_clone(config, url)}")
        except SparkrunError as exc:
            ok = False
            print(f"Error: could not update {label} from {url}: {exc}; kept the last good copy", file=sys.stderr)
    for source in [] if names else list(config["pending"]):
        try:
            added = add_source(config, source)
            print(f"{', '.join(e['name'] for e in added)}: added from {source['url']}")
        except SparkrunError as exc:
            ok = False
            print(f"Error: {exc}", file=sys.stderr)
    return ok


def registry_refs() -> list[RecipeRef]:
    """Recipes of the enabled registries (`**/*.yaml` under each recipes folder). A file stem used
    twice in one registry is named by its path in that folder (`4x-spark-cluster/name`)."""
    refs = []
    for entry in enabled_registries():
        root = registry_folder(entry, "recipes")
        if root is None or not root.is_dir():
            warn(f"registry '{entry['name']}' has no local copy; run 'sparkrun registry update {entry['name']}'")
            continue
        paths = clone_files(entry, "recipes", "*.yaml")
        stems = [p.stem for p in paths]
        for path in paths:
            name = path.stem if stems.count(path.stem) == 1 else path.relative_to(root).with_suffix("").as_posix()
            refs.append(RecipeRef(name, path, entry["name"], entry.get("visible", True)))
    return refs


def registry_mods_dir(recipe: Recipe) -> Path | None:
    """The mods folder of the recipe's registry when it holds all the recipe's mods, else eugr's."""
    entries = {e["name"]: e for e in load_registry_config()["registries"]}
    own = registry_folder(entries[recipe.source], "mods") if recipe.source in entries else None
    if own and own.is_dir() and all((own / Path(m).name).exists() for m in recipe.mods):
        return own
    eugr = registry_folder(entries[EUGR_REGISTRY], "mods") if EUGR_REGISTRY in entries else None
    return eugr if eugr and eugr.is_dir() else None


def registry_tuning_dirs() -> list[Path]:
    folders = [registry_folder(e, "tuning") for e in enabled_registries()]
    return [f for f in folders if f and f.is_dir()]


def benchmark_profiles() -> list[RecipeRef]:
    """Benchmark profiles: YAML files in the enabled registries' benchmarks folders."""
    refs = []
    for entry in enabled_registries():
        refs += [RecipeRef(p.stem, p, entry["name"], entry.get("visible", True))
                 for p in clone_files(entry, "benchmarks", "*.yaml")]
    return refs


def find_benchmark_profile(name: str) -> tuple[Path, dict]:
    """A profile by name, `@registry/name` or path to a YAML file: (its file, its mapping)."""
    path = Path(os.path.expanduser(name))
    if not (name.endswith((".yaml", ".yml")) and path.is_file()):
        source, _, short = name[1:].partition("/") if name.startswith("@") else (None, "", name)
        matches = [r for r in benchmark_profiles() if r.name == short and source in (None, r.source)]
        if len(matches) > 1:
            names = ", ".join(r.qualified for r in matches)
            raise UsageError(f"benchmark profile '{name}' is ambiguous: {names}; use one of these names")
        if not matches:
            raise UsageError(f"no benchmark profile named '{name}'; see 'sparkrun registry list-benchmark-profiles'")
        path = matches[0].path
    _, data = read_yaml_file(path)
    YAML_CACHE.save()
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a benchmark profile must be a YAML mapping")
    return path, data


def catalog(include_hidden: bool = False) -> list[RecipeRef]:
    refs = bundled_refs() + registry_refs()
    return [r for r in refs if r.visible or include_hidden]


def find_recipe(name: str, *, include_hidden: bool = True, runtime: str | None = None) -> Recipe:
    """A path to a file, a name (file stem or `name:` field), or `@registry/name`; `runtime` keeps
    only recipes of that runtime; hidden registries' recipes only with include_hidden.
    Suggestions on a miss."""
    as_path = Path(os.path.expanduser(name))
    if name.endswith((".yaml", ".yml")) or os.sep in name and not name.startswith("@"):
        if as_path.is_file():
            return only_runtime(name, [load_recipe(as_path, source="Local")], runtime)[0]
        if name.endswith((".yaml", ".yml")) or as_path.parent.is_dir():
            raise UsageError(f"recipe file not found: {name}")
    refs = catalog(include_hidden=True)
    source, short = name[1:].partition("/")[::2] if name.startswith("@") else (None, name)
    matches = [r for r in refs if r.name == short and source in (None, r.source)]
    recipes = [load_recipe(r.path, r.source) for r in matches] or recipes_named(refs, short, source)
    if not include_hidden:
        hidden = [r for r in recipes if not visible_ref(refs, r)]
        recipes = [r for r in recipes if r not in hidden]
        if hidden and not recipes:
            raise UsageError(HIDDEN_RECIPE.format(name=name, where=qualified_name(hidden[0])))
    recipes = only_runtime(name, recipes, runtime)
    YAML_CACHE.save()
    if len(recipes) > 1:
        names = ", ".join(qualified_name(r) for r in recipes)
        raise UsageError(f"recipe name '{name}' is ambiguous: {names}; use one of these names")
    if not recipes:
        known = sorted({r.name for r in refs})
        close = [n for n in known if short in n][:3]
        if not close:
            import difflib

            close = difflib.get_close_matches(short, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see 'sparkrun list'"
        raise UsageError(f"no recipe named '{name}'{hint}")
    return recipes[0]


def only_runtime(name: str, recipes: list[Recipe], runtime: str | None) -> list[Recipe]:
    """The recipes of that runtime (all without one); an error when it leaves none of several."""
    chosen = [r for r in recipes if not runtime or r.runtime.startswith(runtime)]
    if recipes and not chosen:
        raise UsageError(f"recipe '{name}' is not a {runtime} recipe (runtime {recipes[0].runtime}); "
                         "drop --runtime or name another")
    return chosen


HIDDEN_RECIPE = "recipe '{name}' is in a hidden registry ({where}); pass --all to use it"


def recipes_named(refs: list[RecipeRef], name: str, source: str | None) -> list[Recipe]:
    """The catalog's recipes whose `name:` field is `name` (recipes that fail to load are skipped)."""
    found = []
    for ref in refs:
        if source in (None, ref.source):
            try:
                recipe = load_recipe(ref.path, ref.source)
            except RecipeError:
                continue
            if recipe.declared_name == name:
                found.append(recipe)
    return found


def visible_ref(refs: list[RecipeRef], recipe: Recipe) -> bool:
    return next(r.visible for r in refs if r.path == recipe.path)


def qualified_name(recipe: Recipe) -> str:
    return RecipeRef(recipe.name, recipe.path, recipe.source).qualified


class RecipeSummary(Record):
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
    "int4": 0.5, "awq": 0.5, "gptq": 0.5, "autoround": 0.5, "w4a16": 0.5, "awq4": 0.5, "awq8": 1,
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
    # Ternary: 256 weights per block in 54 and 66 bytes (ggml's block_tq1_0, block_tq2_0).
    "tq1_0": 1.6875, "tq2_0": 2.0625,
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
    # _XL (unsloth) and _L (Q5_K_L: embeddings and output in Q8_0) mixes are sized as their base
    # quant; Q3_K_L is a quant of its own.
    found = _known_bytes_per_param(name)
    if found is None and name.endswith(("_xl", "_l")):
        name = name.rpartition("_")[0]
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

class ModelArch(Record):
    num_layers: int | None = None
    kv_layers: int | None = None  # layers keeping the whole context; None means all num_layers
    sliding_layers: int = 0  # layers keeping only the last sliding_window tokens
    sliding_window: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mla_dim: int | None = None  # kv_lora_rank + qk_rope_head_dim (DeepSeek-style MLA)
    note: str = ""
    num_attention_heads: int | None = None  # query heads: what tensor parallel splits (from config.json)

    @property
    def missing(self) -> tuple[str, ...]:
        needed = {"num_layers": self.num_layers}
        if not self.mla_dim:
            needed |= {"num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        return tuple(name for name, value in needed.items() if value is None)


def _arch(num_layers, num_kv_heads, head_dim, kv_layers=None, sliding_layers=0, sliding_window=None,
          mla_dim=None, attention_heads=None) -> ModelArch:
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
                     num_kv_heads, head_dim, mla_dim, note, attention_heads)


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
    return _arch(num_layers, kv_heads, head_dim, full, sliding, window, mla_dim, heads)


def arch_from_metadata(meta: dict, config_arch: ModelArch | None = None) -> ModelArch | None:
    """Recipe metadata num_layers / num_kv_heads / head_dim, each winning over config_arch."""
    layers, kv_heads, head_dim = (_positive_int((meta or {}).get(key))
                                  for key in ("num_layers", "num_kv_heads", "head_dim"))
    if config_arch is None:
        return _arch(layers, kv_heads, head_dim) if layers or kv_heads or head_dim else None
    if layers and layers != config_arch.num_layers:  # the config's layer layout no longer applies
        config_arch = _arch(layers, config_arch.num_kv_heads, config_arch.head_dim,
                            mla_dim=config_arch.mla_dim, attention_heads=config_arch.num_attention_heads)
    return config_arch.replace(num_kv_heads=kv_heads or config_arch.num_kv_heads,
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


class VramEstimate(Record):
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
    pp: int = 1  # pipeline parallel: weights and KV are split over tp x pp GPUs
    dtype_note: str = ""  # where the model dtype came from, when not from the recipe


def estimate_vram(*, params, model_dtype, kv_dtype, arch, max_model_len, tp=1, pp=1, gpu_mem=0.9,
                  weights_bytes=None, dtype_note="") -> VramEstimate:
    params, kv_dtype = parse_param_count(params), resolve_kv_dtype(kv_dtype)
    max_model_len, tp, gpu_mem = _positive_int(max_model_len), _positive_int(tp) or 1, float(gpu_mem or 0.9)
    pp = _positive_int(pp) or 1
    gpus = tp * pp
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
    per_gpu = (weights_bytes + kv_bytes) / gpus if weights_bytes is not None and kv_bytes is not None else None
    # Exact bytes, no intermediate rounding: the golden 30B nvfp4 example gives 1,557,583 tokens this
    # way (subtracting the printed 96.8 - 19.56 GB figures instead would give 1,557,538).
    available = usable - weights_bytes / gpus if weights_bytes is not None else None
    max_tokens = (_max_context_tokens(arch, kv_dtype_bytes, gpus, available)
                  if kv_rate_known and available is not None else None)
    multiplier = max_tokens / max_model_len if max_tokens is not None and max_model_len else None
    verdict = UNKNOWN if per_gpu is None else YES if per_gpu <= usable else NO
    return VramEstimate(model_dtype, params, kv_dtype, arch, weights_bytes, kv_bytes, max_model_len, tp,
                        per_gpu, gpu_mem, usable, available, max_tokens, multiplier, verdict,
                        tuple(missing), weights_source, pp=pp, dtype_note=dtype_note)


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
        f"  Model dtype:      {est.model_dtype or 'unknown'}{f' ({est.dtype_note})' if est.dtype_note else ''}",
        f"  Model params:     {'unknown' if est.params is None else f'{est.params:,}'}",
        f"  KV cache dtype:   {est.kv_dtype}",
        f"  Architecture:     {_describe_arch(est.arch)}",
        f"  Model weights:    {_gb(est.weights_bytes)}{on_disk}",
        f"  KV cache:         {_gb(est.kv_bytes)} (max_model_len={max_model_len})",
        f"  Tensor parallel:  {est.tp}",
        *([f"  Pipeline parallel: {est.pp}"] if est.pp > 1 else []),
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
    return {**est.as_dict(), "arch": est.arch and est.arch.as_dict(), "missing": list(est.missing)}


# -- local Hugging Face cache

# A Hugging Face repo id: [namespace/]name, no '--' or '..' (huggingface_hub's own rule).
HF_REPO_ID = re.compile(r"(?!.*(?:--|\.\.))(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def cached_snapshot_dir(hf_home: Path, repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of repo_id at revision (a ref name or a commit) in the local cache;
    None when it is not there, or when a name could lead outside the cache."""
    if not HF_REPO_ID.fullmatch(repo_id) or (revision and revision_problem(revision)):
        return None
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / (revision or "main")
    try:
        commit = ref.read_text().strip() if ref.is_file() else revision or "main"
    except (OSError, ValueError):
        return None
    if revision_problem(commit):
        return None
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


def gguf_quant_match(relative: str, gguf_quant: str) -> bool:
    """Whether a path inside a snapshot belongs to the quant. The quant must stand alone in the
    path: 'Q4_K' must not pick up 'Q4_K_M' files."""
    return bool(re.search(rf"(?<![a-z0-9]){re.escape(gguf_quant.lower())}(?![a-z0-9_])", relative.lower()))


def gguf_quant_files(snapshot: Path, gguf_quant: str) -> list[Path]:
    """The .gguf files of one quant, split shards and quant-named subfolders included, in order."""
    return sorted(path for path in snapshot.rglob("*.gguf")
                  if gguf_quant_match(path.relative_to(snapshot).as_posix(), gguf_quant) and not is_mmproj(path.name))


def cached_weights_bytes(hf_home: Path, repo_id: str, revision: str | None = None,
                         gguf_quant: str | None = None) -> int | None:
    """On-disk weight size: safetensors index total_size, else the sum of the weight files."""
    snapshot = cached_snapshot_dir(hf_home, repo_id, revision)
    if snapshot is None:
        return None
    if gguf_quant:
        files = gguf_quant_files(snapshot, gguf_quant)
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


def hub_forbidden() -> bool:
    """HF_HUB_OFFLINE says this machine must not reach the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not or cannot be reached; decided in about a second."""
    if hub_forbidden():
        return True
    cached = getattr(hub_offline, "answer", None)
    if cached is None:
        import socket
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
    config.json, then the Hub (online only; with tensor parallel always, as only config.json
    has the attention heads tensor parallel splits); on-disk weight sizes win over params x dtype."""
    values = recipe_values(recipe, overrides)
    meta = recipe.metadata
    tp = _positive_int(values.get("tensor_parallel")) or 1
    config = weights = None
    if auto_detect:
        config = read_cached_config(hf_home, recipe.model_repo, recipe.model_revision)
        weights = cached_weights_bytes(hf_home, recipe.model_repo, recipe.model_revision, recipe.gguf_quant)
        has_arch = all(meta.get(k) for k in ("num_layers", "num_kv_heads", "head_dim"))
        if config is None and (tp > 1 or not (has_arch and (meta.get("model_dtype") or recipe.gguf_quant))):
            config = hub_config(recipe.model_repo, recipe.model_revision)
    arch = arch_from_metadata(meta, arch_from_config(config) if config else None)
    gpu_mem = values.get("gpu_memory_utilization")
    if not (isinstance(gpu_mem, (int, float)) and 0 < gpu_mem <= 1):
        gpu_mem = 0.9
    max_len = values.get("max_model_len") or values.get("ctx_size") or (config or {}).get("max_position_embeddings")
    pp = _positive_int(values.get("pipeline_parallel")) or 1
    model_dtype, note = meta.get("model_dtype") or recipe.gguf_quant, ""
    if not model_dtype and config:
        model_dtype, note = config_weight_dtype(config), "from config.json"
    checkpoint_bytes = bytes_per_param(model_dtype)
    online = str(values.get("quantization") or "").lower()
    if online == "fp8" and checkpoint_bytes and checkpoint_bytes > bytes_per_param(online):
        # vLLM and SGLang quantize a wider checkpoint's weights to fp8 as they load it.
        weights = weights and weights * bytes_per_param(online) / checkpoint_bytes
        model_dtype, note = online, f"online quantization of {model_dtype}"
    return estimate_vram(params=meta.get("model_params"), model_dtype=model_dtype,
                         kv_dtype=resolve_kv_dtype(meta.get("kv_dtype"), values.get("kv_cache_dtype")),
                         arch=arch, max_model_len=max_len, tp=tp, pp=pp, gpu_mem=gpu_mem, weights_bytes=weights,
                         dtype_note=note)


def config_weight_dtype(config: dict) -> str | None:
    """The weights' dtype from a config.json: its quantization_config (quant_method, bits, quant_algo,
    weight num_bits), else torch_dtype (`dtype` since transformers 4.56), of the text model too."""
    for part in (config, config.get("text_config") or {}):
        quant = part.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method"):
            return quantization_dtype(quant)
    for part in (config, config.get("text_config") or {}):
        dtype = part.get("torch_dtype") or part.get("dtype")
        if isinstance(dtype, str):
            return dtype
    return None


def quantization_dtype(quant: dict) -> str:
    """A Hugging Face quantization_config as a dtype bytes_per_param knows."""
    method = str(quant["quant_method"]).lower()
    bits = quant.get("bits") or quant.get("w_bit")
    algo = str(quant.get("quant_algo") or "").lower()
    if method == "modelopt" and algo:  # NVIDIA ModelOpt: quant_algo NVFP4, FP8, ...
        return algo
    if method == "compressed-tensors":
        if "nvfp4" in str(quant.get("format", "")).lower():
            return "nvfp4"
        weights = next((g.get("weights") or {} for g in (quant.get("config_groups") or {}).values()
                        if isinstance(g, dict)), {})
        bits, kind = weights.get("num_bits"), weights.get("type")
        if bits:
            return f"fp{bits}" if kind == "float" else f"int{bits}"
    if method == "bitsandbytes":
        return "int4" if quant.get("load_in_4bit") else "int8"
    if method == "awq" and bits in (4, 8):
        return f"awq{bits}"
    if bits in (4, 8) and method != "fp8":
        return f"int{bits}"
    return method



# ---------------------------------------------------------------------------
# 6. Hosts and SSH
# ---------------------------------------------------------------------------
# Every ssh and rsync argv is built by SSH below, and every remote command runs through
# SSH.run: a bash script on stdin, over one ControlMaster connection per host.

HOST_RE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.-]*@)?(?:[A-Za-z0-9][A-Za-z0-9._-]*|\[?[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]?)")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
SSH_CONNECT_TIMEOUT = 10


class HostError(SparkrunError):
    """Something failed on one host; the message names the host and what to do."""

    def __init__(self, host: str, message: str):
        super().__init__(f"{host}: {message}")
        self.host = host


class Unreachable(HostError):
    pass


class AuthRefused(HostError):
    pass


class HostKeyMismatch(HostError):
    pass


class RemoteFailed(HostError):
    pass


def validate_host(host: str) -> str:
    """Hostnames, IPv4, IPv6, ssh aliases and user@host; nothing a shell or ssh could misread."""
    if not host or host.startswith("-") or not HOST_RE.fullmatch(host):
        raise UsageError(f"invalid host {host!r}: expected a hostname, IP address or ssh alias")
    return host


def parse_host_list(text: str) -> list[str]:
    hosts = [validate_host(h.strip()) for h in text.split(",") if h.strip()]
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        raise UsageError(f"host listed twice: {', '.join(duplicates)}")
    return hosts


MAX_HOSTS_FILE_BYTES = 64 * 1024


def read_hosts_file(path: str) -> list[str]:
    lines = read_text_file(Path(path), "hosts file", MAX_HOSTS_FILE_BYTES).splitlines()
    entries = [line.split("#", 1)[0].strip() for line in lines]
    return parse_host_list(",".join(e for e in entries if e))


class RemoteResult(Record):
    host: str
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def stderr_tail(self, lines: int = 3) -> str:
        return " | ".join(self.stderr.strip().splitlines()[-lines:])


def control_dir() -> Path:
    """A private 0700 folder for ControlMaster sockets, short enough for the ~104-byte limit."""
    folder = cache_dir() / "ssh"
    if len(str(folder)) > 60:
        folder = Path(f"/tmp/sparkrun-ssh-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


class SSH:
    """Builds every ssh/rsync command and runs remote scripts; one master connection per host."""

    def __init__(self, user: str | None = None, verbose: int = 0):
        self.user = user
        self.verbose = verbose
        self.extra = shlex.split(os.environ.get("SPARKRUN_SSH_OPTS", ""))
        self._control = None

    def options(self) -> list[str]:
        """ssh options in order, each with its reason (shown with -vv)."""
        if self._control is None:
            self._control = control_dir()
        chosen = [
            (self.extra, "SPARKRUN_SSH_OPTS"),
            (["-o", "BatchMode=yes"], "never prompt: a prompt would hang a parallel fan-out"),
            (["-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}"], "an unreachable host fails fast"),
            (["-o", "ControlMaster=auto"], "one TCP connection per host, shared by every step"),
            (["-o", f"ControlPath={self._control}/%C"], "short hashed socket name in a 0700 folder"),
            (["-o", "ControlPersist=300"], "the next command reuses the connection"),
            (["-o", "ServerAliveInterval=15"], "notice a dead host during long steps"),
        ]
        if self.user:
            chosen.append((["-l", self.user], "--user or the cluster's user"))
        if self.verbose >= 3:
            for flags, reason in chosen:
                print(f"  ssh {' '.join(flags)}  # {reason}", file=sys.stderr)
        return [flag for flags, _ in chosen for flag in flags]

    def argv(self, host: str, remote: list[str], *, stream: bool = False) -> list[str]:
        """stream=True for a long-lived process wired to our own stdio or pipes: it may use
        the master but must never become one (a backgrounded master would keep them open).
        ssh takes the first value given for an option, so this one goes first."""
        return ["ssh", *(["-o", "ControlMaster=no"] if stream else []), *self.options(), "--", host, *remote]

    def rsync_shell(self) -> str:
        """The `rsync -e` value: the same ssh, riding on the same master."""
        return shlex.join(["ssh", *self.options()])

    def run(self, host: str, script: str, *, timeout: float = 120, stdin_data: bytes | None = None,
            check: bool = False, what: str = "") -> RemoteResult:
        """Run a bash script on a host (stdin carries the script, then any data)."""
        payload = script.encode() + (stdin_data or b"")
        local = host in LOCAL_HOSTS
        argv = ["bash", "-s"] if local else self.argv(host, ["bash", "-s"])
        if self.verbose >= 2:
            print(mask(f"[{host}] {shlex.join(argv)} <<'EOF'\n{script.rstrip()}\nEOF"), file=sys.stderr)
        result = self._execute(host, argv, payload, timeout)
        if not local and result.returncode == 255 and "mux_client" in result.stderr:
            self.exit_master(host)  # a stale master: drop it and try once more
            result = self._execute(host, argv, payload, timeout)
        if not local:
            classify_ssh_failure(result, self.user)
        if check and not result.ok:
            raise RemoteFailed(host, f"{what or 'remote command'} failed (exit {result.returncode}): "
                                     f"{result.stderr_tail() or result.stdout.strip()[-300:]}")
        return result

    def _execute(self, host: str, argv: list[str], payload: bytes, timeout: float) -> RemoteResult:
        start = time.monotonic()
        try:
            # Its own session: Ctrl+C at the terminal must not kill a `docker run` in flight,
            # which a rollback waits for (an interrupted caller's subprocess.run kills it).
            done = subprocess.run(argv, input=payload, capture_output=True, timeout=timeout,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise Unreachable(host, f"no answer within {timeout:.0f} s; check the host and the network") from None
        except FileNotFoundError:
            raise SparkrunError("the 'ssh' command is not installed; install openssh-client") from None
        return RemoteResult(host, done.returncode, done.stdout.decode(errors="replace"),
                            done.stderr.decode(errors="replace"), time.monotonic() - start)

    def run_all(self, hosts: list[str], script_for, **kwargs) -> dict[str, RemoteResult | HostError]:
        """Run per-host scripts in parallel; each host gets its result or its HostError."""
        return in_parallel(hosts, lambda host: self.run(
            host, script_for(host) if callable(script_for) else script_for, **kwargs))

    def exit_master(self, host: str) -> None:
        subprocess.run(self.argv(host, [])[:-1] + ["-O", "exit", host], capture_output=True, timeout=10)


def in_parallel(hosts: list[str], work, running: list | None = None) -> dict:
    """work(host) on every host at once; a host's HostError becomes its result. Other exceptions
    (bugs, Ctrl+C in the main thread) propagate. `running` collects an Event per host, set when
    its work is over, so that a caller interrupted meanwhile can wait for it (an interrupted
    Thread.join can leave is_alive() wrongly False: CPython's bpo-45274 handling)."""
    results: dict = {}
    failures: list[BaseException] = []
    over = {h: threading.Event() for h in hosts}

    def one(host):
        try:
            results[host] = work(host)
        except HostError as exc:
            results[host] = exc
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)
        finally:
            over[host].set()

    if running is not None:
        running.extend(over.values())
    run_threads([threading.Thread(target=one, args=(h,), daemon=True) for h in hosts])
    if failures:
        raise failures[0]
    return {h: results[h] for h in hosts}


def run_threads(threads: list) -> None:
    """Start the threads and wait for all of them; short joins keep Ctrl+C responsive."""
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)


def classify_ssh_failure(result: RemoteResult, user: str | None) -> None:
    """Turn ssh's own failures (exit 255 plus its message) into one-line, actionable errors."""
    if result.returncode != 255:
        return
    err = result.stderr
    host = result.host
    if "Permission denied" in err or "Too many authentication failures" in err:
        who = f"user '{user}'" if user else "the ssh user"
        raise AuthRefused(host, f"ssh refused the login for {who}; install your key (ssh-copy-id) "
                                f"or pass --user")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err or "Host key verification failed" in err:
        raise HostKeyMismatch(host, "host key mismatch or unknown host key; if the host was reinstalled, "
                                    f"run: ssh-keygen -R {host.rpartition('@')[2]}")
    if re.search(r"Could not resolve hostname|Connection (timed out|refused)|No route to host|"
                 r"Network is unreachable|Connection closed by|kex_exchange|Operation timed out|"
                 r"closed by remote host|Connection reset|Broken pipe|client_loop", err):
        raise Unreachable(host, f"cannot connect over ssh ({result.stderr_tail(1)})")
    if not result.stdout and err.strip().startswith(("ssh:", "ssh_", "mux_", "Control")):
        raise Unreachable(host, f"ssh failed: {result.stderr_tail(1)}")


DOCKER_HELP = ("docker is not usable by this user; add the user to the docker group: "
               "sudo usermod -aG docker $USER (then log in again)")


def docker_problem(stderr: str) -> str:
    """What a failed docker command on a host means, and what to do."""
    text = stderr.lower()
    if "permission denied" in text:
        return DOCKER_HELP
    if "command not found" in text or "no such file" in text:
        return "docker is not installed on this host; install Docker and the NVIDIA container toolkit"
    if "cannot connect to the docker daemon" in text:
        return "the docker daemon is not running; start it (sudo systemctl start docker)"
    return f"docker failed: {' | '.join(stderr.strip().splitlines()[-2:])[:300]}"


class IbDevice(Record):
    hca: str
    state: str
    netdev: str
    ipv4: str | None  # address/prefix, e.g. 10.10.10.1/24
    gid_index: int | None  # the RoCE v2 GID of an IPv4 address
    mtu: int | None = None  # its netdev's MTU

    @property
    def subnet(self):
        """The network its address is on (an ipaddress network; equal for every port on it)."""
        import ipaddress

        return ipaddress.ip_interface(self.ipv4).network


def rdma_port(hca: str) -> str:
    """The physical port of an RDMA device: its name without the PCI domain, so that twins
    (rocep1s0f1 in domain 0, roceP2p1s0f1 in domain 2) name the same port."""
    return re.sub(r"P\d+(?=p\d+s\d+f\d+$)", "", hca)


SPARK_ARCH = "arm64"  # DGX Spark: Grace CPU; docker names platforms by Go's GOARCH
# What identifies an image across `docker save | docker load` and image stores: `.Id` is the
# config digest on overlay2 but the manifest digest on the containerd image store; RepoDigests
# come from a registry; the layers' diff IDs (RootFS) stay the same (moby/moby#47674).
IMAGE_FORMAT = ("{{.Id}}|{{.Architecture}}|{{json .RepoDigests}}|{{json .RootFS.Layers}}|{{.Created}}|"
                "{{json .Config.Entrypoint}}")


class ImageInfo(Record):
    id: str
    arch: str = ""
    digests: tuple = ()
    layers: tuple = ()
    created: str = ""  # when the image was built, RFC 3339 ("2026-11-20T04:12:09.5Z")
    entrypoint: tuple = ()  # ENTRYPOINT, () for none

    def describe(self) -> str:
        """Its short ID and build date, as a note names a copy."""
        built = f", created {self.created[:16].replace('T', ' ')} UTC" if self.created else ""
        return f"{self.id.removeprefix('sha256:')[:12]}{built}"


def parse_image_info(text: str) -> ImageInfo | None:
    """An IMAGE_FORMAT line (or a bare ID); None for an empty one."""
    parts = text.split("|", 5)
    if not parts[0]:
        return None

    def listed(value: str) -> tuple:
        try:
            return tuple(json.loads(value) or ())
        except ValueError:
            return ()

    parts += [""] * (6 - len(parts))
    return ImageInfo(parts[0], parts[1], listed(parts[2]), listed(parts[3]), parts[4], listed(parts[5]))


def same_image(a: ImageInfo | None, b: ImageInfo | None) -> bool:
    """The same image, whichever image store each side uses: same architecture, and the same
    ID, a shared registry digest, or the same layers."""
    if not a or not b or (a.arch and b.arch and a.arch != b.arch):
        return False
    return a.id == b.id or bool(set(a.digests) & set(b.digests)) or (bool(a.layers) and a.layers == b.layers)


class HostFacts(Record):
    """What one round trip to a host tells: identity, networks, GPU, memory, docker, ports, images."""
    host: str
    hostname: str = ""
    addresses: tuple = ()  # (ifname, address/prefix)
    ib: tuple = ()  # IbDevice
    gpu: str = ""  # nvidia-smi's "name, memory.total" ("[N/A]" total on a Spark: memory is unified)
    containers: tuple = ()  # docker ps JSON objects of sparkrun containers
    docker_error: str = ""
    listening: tuple = ()  # (address, port) of listening TCP sockets
    images: tuple = ()  # (image, IMAGE_FORMAT line or "")
    docker_arch: str = ""  # the docker daemon's platform architecture (arm64 on a Spark)
    other_containers: tuple = ()  # docker ps JSON objects of running containers that are not sparkrun's
    gpu_processes: tuple = ()  # (pid, MiB) of the processes holding GPU memory
    mem_total_mib: int | None = None  # /proc/meminfo MemTotal
    mem_available_mib: int | None = None  # /proc/meminfo MemAvailable
    shmem_mib: int | None = None  # /proc/meminfo Shmem: tmpfs (/dev/shm) and shared memory, not reclaimable
    compile_caches: tuple = ()  # (engine, KiB) of ~/.cache/sparkrun/compile/<engine>, when asked for
    entrypoint_checks: tuple = ()  # (image, whether its ENTRYPOINT runs its arguments): check_entrypoint
    # What the status probe (probe_script with metric_names) adds:
    clock: float = 0.0  # the host's time, epoch seconds
    gpu_load: tuple = ()  # GpuLoad per GPU
    engines: dict = {}  # container name -> ContainerProbe

    @property
    def gpu_total_bytes(self) -> int | None:
        """The GPU's memory; the host's when nvidia-smi has no figure (a Spark's unified memory)."""
        total = re.search(r",\s*(\d+) MiB$", self.gpu)
        if total:
            return int(total[1]) * 2**20
        return self.mem_total_mib * 2**20 if self.mem_total_mib else None

    @property
    def active_ib(self) -> list[IbDevice]:
        return sorted((d for d in self.ib if "ACTIVE" in d.state and d.ipv4), key=lambda d: d.hca)

    @property
    def rdma_devices(self) -> list[IbDevice]:
        """Every active device of the ports in use. A ConnectX-7 port shows as two RDMA devices
        (twins, e.g. rocep1s0f1 and roceP2p1s0f1), often with an address on one only; NCCL needs
        both to reach the port's full bandwidth."""
        in_use = {rdma_port(d.hca) for d in self.active_ib}
        return sorted((d for d in self.ib if "ACTIVE" in d.state and rdma_port(d.hca) in in_use),
                      key=lambda d: d.hca)

    def interface_of(self, address: str) -> str:
        """The interface holding `address` on this host, or ""."""
        return next((i for i, c in self.addresses if c.split("/")[0] == address), "")

    @property
    def management_ip(self) -> str:
        ib_devs = {d.netdev for d in self.ib}
        for ifname, cidr in self.addresses:
            if ifname != "lo" and ifname not in ib_devs:
                return cidr.split("/")[0]
        return ""

    def port_busy(self, port: int) -> bool:
        own = {cidr.split("/")[0] for _, cidr in self.addresses} | {self.host}
        return any(p == port and (a in ("0.0.0.0", "::") or a in own) for a, p in self.listening)

    def image_info(self, image: str) -> ImageInfo | None:
        return parse_image_info(dict(self.images).get(image, ""))

    def image_id(self, image: str) -> str:
        info = self.image_info(image)
        return info.id if info else ""

    def image_config(self, image: str) -> list | None:
        """The image's ENTRYPOINT ([] for none), or None when this host lacks the image."""
        info = self.image_info(image)
        return list(info.entrypoint) if info else None


# /proc/meminfo's MemTotal, MemAvailable and Shmem (kB) into $total, $available and $shmem, with
# bash builtins; SPARKRUN_MEMINFO replaces the file on the test bed's simulated hosts.
READ_MEMINFO = """\
while read -r key value _; do
  case $key in MemTotal:) total=$value;; MemAvailable:) available=$value;; Shmem:) shmem=$value;; esac
done 2>/dev/null < "${SPARKRUN_MEMINFO:-/proc/meminfo}"
"""


def probe_script(images: tuple = (), metric_names: tuple = (), caches: bool = False) -> str:
    """One bash script that reports everything HostFacts holds, in marked sections. The tools
    (docker, nvidia-smi, ip, ss: slowest first) start at once, each into its own pipe;
    one `cat` prints the pipes in order at the end. Everything else is bash builtins, and the
    raw outputs are parsed here, so a probe starts few processes on the host. MemTotal,
    MemAvailable and Shmem are read last, as of the GPU process list. With metric_names (the status probe)
    it also reports the host's load and each sparkrun container's health, with those figures
    from the head's /metrics (MONITOR_SCRIPT, engines_script); with caches, the size of each
    engine's compile cache. SPARKRUN_SYSFS and SPARKRUN_MEMINFO replace /sys and /proc/meminfo
    on the test bed's simulated hosts."""
    inspect = "".join(
        f"printf '%s\\t%s\\n' {shlex.quote(i)} \"$(docker image inspect --format {shlex.quote(IMAGE_FORMAT)} "
        f"{shlex.quote(i)} 2>/dev/null)\"; " for i in images)
    optional = (f"exec {{images}}< <(echo @@arch; docker version --format '{{{{.Server.Arch}}}}' 2>/dev/null; "
                f"echo @@images; {inspect})\n") if inspect else ""
    if caches:  # du -sk: "<KiB>\t<folder>/"
        optional += (f"exec {{caches}}< <(echo @@caches; du -sk {remote_join([REMOTE_COMPILE_CACHE])}/*/ "
                     "2>/dev/null)\n")
    engines = f"\n{engines_script(metric_names)}" if metric_names else ""
    return f"""\
exec {{docker}}< <(echo @@docker; containers=$(docker ps -a --no-trunc --format '{{{{json .}}}}' 2>&1) \\
  || containers+=$'\\n@@docker_failed'; [ -z "$containers" ] || echo "$containers"{engines})
exec {{gpu}}< <(echo @@gpu; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)
exec {{apps}}< <(echo @@gpu_processes; nvidia-smi --query-compute-apps=pid,used_memory \\
  --format=csv,noheader,nounits 2>/dev/null)
exec {{addrs}}< <(echo @@addrs; ip -o -4 addr show 2>/dev/null)
exec {{listen}}< <(echo @@listen; ss -Hltn 2>/dev/null)
{optional}sysfs=${{SPARKRUN_SYSFS:-/sys}}
echo @@hostname; echo "$HOSTNAME"
echo @@ib
for hca in "$sysfs"/class/infiniband/*; do
  [ -d "$hca" ] || continue
  gid= state= netdev=
  for t in "$hca"/ports/1/gid_attrs/types/*; do  # a port has many GID entries
    read -r kind < "$t" 2>/dev/null && [ "$kind" = "RoCE v2" ] || continue
    n=${{t##*/}}
    read -r value < "$hca/ports/1/gids/$n" 2>/dev/null || continue
    case "$value" in 0000:0000:0000:0000:0000:ffff:*) gid=$n; break;; esac
  done
  read -r state < "$hca/ports/1/state" 2>/dev/null
  for n in "$hca"/device/net/*; do [ -e "$n" ] && netdev=${{n##*/}}; break; done
  mtu=; [ -n "$netdev" ] && [ -r "$sysfs/class/net/$netdev/mtu" ] && read -r mtu < "$sysfs/class/net/$netdev/mtu"
  echo "${{hca##*/}}|$state|$netdev|$gid|$mtu"
done
{MONITOR_SCRIPT if metric_names else ""}\
cat /dev/fd/$addrs /dev/fd/$listen /dev/fd/$gpu /dev/fd/$apps /dev/fd/$docker\
{" /dev/fd/$images" if images else ""}{" /dev/fd/$caches" if caches else ""}\
{" /dev/fd/$gpu_load" if metric_names else ""}
{READ_MEMINFO}\
echo @@memtotal; echo "$total"; echo @@meminfo; echo "$available"; echo @@shmem; echo "$shmem"
echo @@end
"""


METRICS_TIMEOUT_S = 3
FAILED_LOG_LINES = 8
METRIC_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# The status probe's host figures: the GPU's load in a pipe of its own, and the host's clock (for
# uptimes and rates) with a builtin.
MONITOR_SCRIPT = """\
exec {gpu_load}< <(echo @@gpu_load; nvidia-smi --query-gpu=memory.used,utilization.gpu,temperature.gpu,power.draw --format=csv,noheader,nounits 2>/dev/null)
echo @@clock; echo "${EPOCHREALTIME:-$(date +%s.%N)}"
"""


def engines_script(metric_names: tuple) -> str:
    """The status probe's part of the docker pipe, given docker ps's lines (every container) in
    $containers: per sparkrun container its state; for a running head, the HTTP status and the
    lines of metric_names of its /metrics (asked from the host itself, on 127.0.0.1 and then the
    head's address, so it works whether or not the endpoint is reachable from here); for a
    stopped container, its last log lines."""
    names = "|".join(n for n in metric_names if METRIC_NAME.fullmatch(n))
    container_format = ("{{.Name}}|{{.State.Status}}|{{.State.ExitCode}}|{{.RestartCount}}|{{.State.StartedAt}}|"
                        '{{index .Config.Labels "sparkrun.role"}}|{{index .Config.Labels "sparkrun.port"}}|'
                        '{{index .Config.Labels "sparkrun.head"}}')
    return f"""\
echo @@engines
metrics() {{
  for address in 127.0.0.1 "$3"; do
    {{ exec 3<>"/dev/tcp/$address/$2"; }} 2>/dev/null || continue
    printf 'GET /metrics HTTP/1.0\\r\\nHost: %s:%s\\r\\nConnection: close\\r\\n\\r\\n' "$address" "$2" >&3
    timeout {METRICS_TIMEOUT_S} grep -E '^(HTTP/|({names})[{{ ])' <&3 |
      while IFS= read -r line; do echo "metric|$1|${{line%$'\\r'}}"; done
    exec 3<&-
    return
  done
  echo "metric|$1|"
}}
ids=() id_field='"ID":"([0-9a-f]+)"'
while IFS= read -r line; do
  [[ $line == *sparkrun.cluster=* && $line =~ $id_field ]] && ids+=("${{BASH_REMATCH[1]}}")
done <<< "$containers"
[ ${{#ids[@]}} -gt 0 ] && docker inspect --format {shlex.quote(container_format)} "${{ids[@]}}" 2>/dev/null |
while IFS='|' read -r name state code restarts started role port head; do
  name=${{name#/}}
  echo "container|$name|$state|$code|$restarts|$started"
  if [ "$state" != running ]; then
    docker logs --tail {FAILED_LOG_LINES} "$name" 2>&1 </dev/null |
      while IFS= read -r line; do echo "log|$name|$line"; done
  elif [ "$role" = head ] && [ -n "$port" ]; then
    metrics "$name" "$port" "${{head##*@}}"
  fi
done"""


def parse_probe(host: str, output: str) -> HostFacts:
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        marker = line[2:] if line.startswith("@@") else ""
        if marker in ("hostname", "addrs", "ib", "gpu", "docker", "listen", "arch", "images", "caches", "end",
                      "clock", "memtotal", "meminfo", "shmem", "gpu_load", "gpu_processes", "engines"):
            current = sections.setdefault(marker, [])
        elif current is not None:
            current.append(line)
    # `ip -o -4 addr show`: "2: eth0    inet 10.0.0.5/24 brd ... scope global eth0 ..."
    addresses = tuple((f[1], f[3]) for f in map(str.split, sections.get("addrs", []))
                      if len(f) > 3 and f[2] == "inet")
    by_dev = dict(addresses)
    ib = []
    for line in sections.get("ib", []):
        hca, state, netdev, gid, mtu = (line.split("|") + [""] * 5)[:5]
        ib.append(IbDevice(hca, state.strip(), netdev, by_dev.get(netdev), int(gid) if gid.isdigit() else None,
                           int(mtu) if mtu.isdigit() else None))
    docker_lines = sections.get("docker", [])
    containers, others, docker_error = [], [], ""
    if "@@docker_failed" in docker_lines:
        docker_error = " ".join(l for l in docker_lines if l != "@@docker_failed").strip()
    else:
        for line in docker_lines:
            try:
                container = json.loads(line)
            except ValueError:
                docker_error = line.strip()
                continue
            if "sparkrun.cluster" in label_map(container):
                containers.append(container)
            elif container.get("State") == "running":
                others.append(container)
    caches = tuple((folder.rstrip("/").rpartition("/")[2], int(kib)) for kib, _, folder in
                   (l.partition("\t") for l in sections.get("caches", [])) if kib.isdigit())
    images = tuple(tuple(line.split("\t", 1)) for line in sections.get("images", []) if "\t" in line)
    # `ss -Hltn`: "LISTEN 0 4096 127.0.0.11:8000 0.0.0.0:*"
    listening = tuple(listen_address(f[3]) for f in map(str.split, sections.get("listen", []))
                      if len(f) > 3 and f[0] == "LISTEN")
    return HostFacts(host, (sections.get("hostname") or [""])[0], addresses, tuple(ib),
                     (sections.get("gpu") or [""])[0], tuple(containers), docker_error, listening, images,
                     (sections.get("arch") or [""])[0].strip(), tuple(others),
                     gpu_processes=parse_gpu_processes(sections.get("gpu_processes", [])),
                     mem_total_mib=parse_meminfo_mib(sections.get("memtotal", [])),
                     mem_available_mib=parse_meminfo_mib(sections.get("meminfo", [])),
                     shmem_mib=parse_meminfo_mib(sections.get("shmem", [])), compile_caches=caches,
                     clock=parse_clock(sections.get("clock", [])),
                     gpu_load=parse_gpu_load(sections.get("gpu_load", [])),
                     engines=parse_engines(sections.get("engines", [])))


class GpuLoad(Record):
    """One GPU's figures; None where nvidia-smi says [N/A] (a DGX Spark's memory.used)."""
    memory_used_mib: float | None
    utilization: float | None  # percent
    temperature: float | None  # degrees C
    power: float | None  # watts


class ContainerProbe(Record, mutable=True):
    """One sparkrun container as the status probe saw it."""
    state: str  # docker's: running, exited, restarting, dead, created, paused
    exit_code: str
    restarts: int
    started: str  # RFC 3339
    http_status: int | None = None  # of the head's /metrics; None: not answering
    metrics: list = []  # its lines of the asked metric names
    logs: list = []  # last log lines, when not running


def number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # [N/A], [Not Supported]
        return None


def parse_clock(lines: list[str]) -> float:
    """$EPOCHREALTIME (a comma in some locales)."""
    return (number_or_none(lines[0].replace(",", ".")) or 0.0) if lines else 0.0


def parse_meminfo_mib(lines: list[str]) -> int | None:
    """A /proc/meminfo figure (MemTotal, MemAvailable, Shmem), in kB, to MiB."""
    return int(lines[0]) // 1024 if lines and lines[0].isdigit() else None


def parse_gpu_load(lines: list[str]) -> tuple:
    """`nvidia-smi --query-gpu=memory.used,utilization.gpu,temperature.gpu,power.draw
    --format=csv,noheader,nounits`: "[N/A], 96, 61, 87.35" on a DGX Spark."""
    return tuple(GpuLoad(*(number_or_none(v.strip()) for v in (line.split(",") + ["", "", ""])[:4]))
                 for line in lines if line.strip())


def parse_gpu_processes(lines: list[str]) -> tuple:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`: "4242, 110315"."""
    found = []
    for line in lines:
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and number_or_none(mib.strip()) is not None:
            found.append((int(pid), float(mib)))
    return tuple(found)


def parse_engines(lines: list[str]) -> dict:
    """The engines pipe's "container|...", "metric|name|line" and "log|name|line" lines."""
    probes: dict[str, ContainerProbe] = {}
    for line in lines:
        kind, _, rest = line.partition("|")
        if kind == "container":
            name, state, code, restarts, started = (rest.split("|") + [""] * 4)[:5]
            probes[name] = ContainerProbe(state, code, int(restarts) if restarts.isdigit() else 0, started)
            continue
        name, _, text = rest.partition("|")
        probe = probes.get(name)
        if probe is None:
            continue
        if kind == "log":
            probe.logs.append(text)
        elif kind == "metric" and text.startswith("HTTP/"):
            status = text.split()[1:2]
            probe.http_status = int(status[0]) if status and status[0].isdigit() else None
        elif kind == "metric" and text:
            probe.metrics.append(text)
    return probes


def listen_address(local: str) -> tuple[str, int]:
    """ss's local address to (address, port): '127.0.0.11:8000', '[::]:22', '*:80' (any address),
    '[::ffff:127.0.0.11]:8001' (an IPv4 client on an IPv6 socket), '127.0.0.53%lo:53'."""
    address, _, port = local.rpartition(":")
    address = address.strip("[]").partition("%")[0]
    if address == "*":
        address = "0.0.0.0"
    elif address.startswith("::ffff:") and "." in address:
        address = address[len("::ffff:"):]
    return address, int(port)


def probe_hosts(ssh: SSH, hosts, images: tuple = (), metric_names: tuple = (),
                caches: bool = False) -> dict[str, HostFacts | HostError]:
    results = ssh.run_all(list(hosts), probe_script(images, metric_names, caches), timeout=SSH_CONNECT_TIMEOUT + 20)
    facts = {}
    for host, result in results.items():
        if not isinstance(result, HostError) and "@@end" not in result.stdout:
            result = RemoteFailed(host, "the login shell did not run sparkrun's script (is bash the user's "
                                        f"shell?): {result.stderr_tail(1) or result.stdout.strip()[-200:]}")
        facts[host] = result if isinstance(result, HostError) else parse_probe(host, result.stdout)
    return facts


# ---------------------------------------------------------------------------
# 7. Clusters
# ---------------------------------------------------------------------------
# Saved host lists in config_dir()/clusters.yaml:
#   default: lab
#   clusters: {lab: {hosts: [spark1, spark2], description: "...", user: ubuntu}}

CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def clusters_path() -> Path:
    return config_dir() / "clusters.yaml"


def read_clusters() -> dict:
    """clusters.yaml; a wrong shape is a one-line error naming the file and what is wrong."""
    path = clusters_path()
    if not path.exists():
        return {"default": None, "clusters": {}}
    _, data = read_yaml_file(path)
    data = {} if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("clusters") or {}, dict):
        raise UsageError(f"{path}: not a clusters file (expected 'clusters:' mapping); fix or remove it")
    clusters = data.get("clusters") or {}
    for name, cluster in clusters.items():
        problem = cluster_problem(name, cluster)
        if problem:
            raise UsageError(f"{path}: cluster {name!r}: {problem}; fix or remove it")
    default = data.get("default")
    if default is not None and default not in clusters:
        raise UsageError(f"{path}: the default cluster {default!r} is not one of its clusters; fix or remove it")
    return {"default": default, "clusters": clusters}


def cluster_problem(name, cluster) -> str | None:
    if not isinstance(name, str) or not CLUSTER_NAME_RE.fullmatch(name):
        return "the name must be letters, digits, '.', '_' or '-'"
    if not isinstance(cluster, dict):
        return "expected a mapping with 'hosts:'"
    hosts = cluster.get("hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        return "'hosts' must be a list of host names"
    user = cluster.get("user")
    try:
        for host in hosts:
            validate_host(host)
        if len(set(hosts)) < len(hosts):
            return "a host is listed twice"
        if user is not None:
            validate_host(f"{user}@x" if isinstance(user, str) else "")
    except UsageError as exc:
        return str(exc)
    if not isinstance(cluster.get("description") or "", str):
        return "'description' must be text"
    return None


def change_clusters(change) -> dict:
    """Apply change(data) under the lock and write the file atomically."""
    import yaml

    with ConfigLock(clusters_path()):
        data = read_clusters()
        change(data)
        atomic_write(clusters_path(), yaml.safe_dump(data, sort_keys=True))
    return data


def check_cluster_name(name: str) -> str:
    if not CLUSTER_NAME_RE.fullmatch(name):
        raise UsageError(f"invalid cluster name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def get_cluster(name: str, data: dict | None = None) -> dict:
    clusters = (data or read_clusters())["clusters"]
    if name not in clusters:
        known = ", ".join(sorted(clusters)) or "none yet; see 'sparkrun cluster create'"
        raise UsageError(f"no cluster named '{name}' (known: {known})")
    return clusters[name]


class HostSelection(Record):
    hosts: tuple[str, ...]
    user: str | None
    source: str  # where the hosts came from, for messages

    @property
    def head(self) -> str:
        return self.hosts[0]


def select_hosts(args, *, required: bool = True) -> HostSelection:
    """--hosts > --hosts-file > --cluster > the default cluster; --solo keeps the head only
    (localhost when nothing else is given). User: --user > the cluster's user > ssh config."""
    user = getattr(args, "user", None)
    cluster_user, hosts, source = None, None, ""
    if getattr(args, "hosts", None):
        hosts, source = parse_host_list(args.hosts), "--hosts"
    elif getattr(args, "hosts_file", None):
        hosts, source = read_hosts_file(args.hosts_file), f"hosts file {args.hosts_file}"
    else:
        name = getattr(args, "cluster", None) or read_clusters()["default"]
        if name:
            cluster = get_cluster(name)
            hosts, cluster_user, source = list(cluster.get("hosts") or []), cluster.get("user"), f"cluster {name}"
    if not hosts and getattr(args, "solo", False):
        hosts, source = ["localhost"], "--solo"
    if not hosts:
        if not required:
            return HostSelection((), user, "")
        raise UsageError("no hosts: pass --hosts/-H, --hosts-file or --cluster, or set a default cluster "
                         "(sparkrun cluster create NAME --hosts ... && sparkrun cluster set-default NAME)")
    if user:
        validate_host(f"{user}@x")
    if getattr(args, "solo", False):
        hosts = hosts[:1]
    return HostSelection(tuple(hosts), user or cluster_user, source)


def cmd_cluster_create(args) -> int:
    name = check_cluster_name(args.name)
    hosts = parse_host_list(args.hosts) if args.hosts else read_hosts_file(args.hosts_file) if args.hosts_file else []
    if not hosts:
        raise UsageError("a cluster needs hosts: pass --hosts a,b or --hosts-file F")
    if args.user:
        validate_host(f"{args.user}@x")

    def create(data):
        if name in data["clusters"]:
            raise UsageError(f"cluster '{name}' already exists; use 'sparkrun cluster update {name}'")
        entry = {"hosts": hosts, "description": args.description or ""}
        if args.user:
            entry["user"] = args.user
        data["clusters"][name] = entry
        if args.default:
            data["default"] = name

    change_clusters(create)
    print(f"Cluster '{name}' created with {len(hosts)} host(s): {', '.join(hosts)}")
    return 0


def cmd_cluster_update(args) -> int:
    name = args.name
    hosts = parse_host_list(args.hosts) if args.hosts else read_hosts_file(args.hosts_file) if args.hosts_file else None
    if args.user:
        validate_host(f"{args.user}@x")

    def update(data):
        entry = get_cluster(name, data)
        if hosts is not None:
            entry["hosts"] = hosts
        if args.description is not None:
            entry["description"] = args.description
        if args.user is not None:
            if args.user:
                entry["user"] = args.user
            else:
                entry.pop("user", None)

    change_clusters(update)
    print(f"Cluster '{name}' updated.")
    return 0


def cmd_cluster_list(args) -> int:
    data = read_clusters()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data["clusters"]:
        print("No clusters yet. Create one: sparkrun cluster create NAME --hosts a,b")
        return 0
    rows = [[("* " if n == data["default"] else "  ") + n, str(len(c.get("hosts") or [])),
             ",".join(c.get("hosts") or []), c.get("user") or "", c.get("description") or ""]
            for n, c in sorted(data["clusters"].items())]
    print_table(rows, ["  NAME", "HOSTS", "ADDRESSES", "USER", "DESCRIPTION"])
    return 0


def cmd_cluster_show(args) -> int:
    cluster = get_cluster(args.name)
    if args.json:
        print(json.dumps(dict(cluster, name=args.name), indent=2))
        return 0
    default = read_clusters()["default"] == args.name
    print(f"Name:         {args.name}{' (default)' if default else ''}")
    print(f"Description:  {cluster.get('description') or ''}")
    print(f"User:         {cluster.get('user') or '(ssh config / current user)'}")
    print("Hosts:")
    for index, host in enumerate(cluster.get("hosts") or []):
        print(f"  {host}{'  (head)' if index == 0 else ''}")
    return 0


def cmd_cluster_delete(args) -> int:
    def delete(data):
        get_cluster(args.name, data)
        del data["clusters"][args.name]
        if data["default"] == args.name:
            data["default"] = None

    change_clusters(delete)
    print(f"Cluster '{args.name}' deleted.")
    return 0


def cmd_cluster_set_default(args) -> int:
    def set_default(data):
        get_cluster(args.name, data)
        data["default"] = args.name

    change_clusters(set_default)
    print(f"Default cluster: {args.name}")
    return 0


def cmd_cluster_unset_default(args) -> int:
    change_clusters(lambda data: data.update(default=None))
    print("No default cluster.")
    return 0


def cmd_cluster_default(args) -> int:
    name = read_clusters()["default"]
    print(name or "No default cluster.")
    return 0


# ---------------------------------------------------------------------------
# 8. Launch plan
# ---------------------------------------------------------------------------
# A LaunchPlan is pure data: per host, the exact container to start, in order, with the waits
# between them. `run --dry-run` prints it; execution (section 9) walks it.

DEFAULT_INIT_PORT = {"vllm-distributed": 29501, "sglang": 25000, "llama-cpp": 50052}
DEFAULT_RAY_PORT = 46379
# The variables nccl_env sets: each host's own, never to be copied from one node to another.
HOST_INTERFACE_ENV = ("NCCL_NET", "NCCL_IB_DISABLE", "NCCL_IB_HCA", "UCX_NET_DEVICES", "NCCL_SOCKET_IFNAME",
                      "GLOO_SOCKET_IFNAME", "NCCL_IGNORE_CPU_AFFINITY", "NCCL_IB_SUBNET_AWARE_ROUTING",
                      "NCCL_IB_MERGE_NICS", "NCCL_IB_GID_INDEX")
DEFAULT_DASHBOARD_PORT = 8265
CONTAINER_HF_HOME = "/root/.cache/huggingface"
REMOTE_MODS = "~/.cache/sparkrun/mods"  # on the hosts, one folder per launch
CONTAINER_MODS = "/root/.cache/sparkrun/mods"
REMOTE_COMPILE_CACHE = "~/.cache/sparkrun/compile"  # on the hosts, one folder per engine
CONTAINER_COMPILE_CACHE = "/root/.cache/sparkrun/compile"
# Names that look like credentials: their values are secrets wherever they appear.
SECRET_NAME = re.compile(r"KEY(?:$|_)|TOKEN|SECRET|PASS|PWD|CREDENTIAL|PRIVATE|AUTH|COOKIE|SESSION", re.I)
ENV_NOT_ALLOWED = ("recipe {recipe}: env {key} uses ${{{name}}}, but recipes from registry {registry} may only read "
                   "the variables listed under 'allow_env' in {file}; add {name} there if you trust this "
                   "registry, or copy the recipe into a file of your own")
TP_HEADS_REFUSED = ("{model} has {heads} attention heads ({kv_heads} key/value heads), which {runtime} cannot "
                    "split over tensor parallel {tp}: use --tp {sizes}")
RING_ORDER_REFUSED = ("{first} and {second} share no CX7 link: on Sparks cabled in a ring (one subnet per link) "
                      "hosts must be listed in cable order, each next to its neighbours and the last next to "
                      "the first; {fix}")
RING_ORDER_FIX = "list them as --hosts {order}"
RING_NOT_CLOSED = ("no order of these {count} hosts closes a ring (a ring's closing link needs all its Sparks): "
                   "launch on the whole ring, or on a directly cabled pair")
EMBEDDING_HINTS = re.compile(r"--runner[ =]+pooling|--task[ =]+(embed|score|classify|reward)|--is-embedding|"
                             r"--embedding\b|--reranking\b|--pooling\b")


# Every engine container: the host's network and GPU; the host's IPC namespace, which gives it the
# host's /dev/shm (so no --shm-size, which only sizes a private one); unlimited locked memory for
# RDMA; a 64 MiB stack, as NVIDIA's PyTorch containers ask for.
DOCKER_RUN_FLAGS = ("--network", "host", "--gpus", "all", "--ipc", "host",
                    "--ulimit", "memlock=-1", "--ulimit", "stack=67108864")


class ContainerSpec(Record):
    host: str
    name: str
    role: str  # head, worker1, worker2, ...
    image: str
    command: str  # run by `bash -c` inside the container
    env: tuple = ()  # (key, value), shown as is
    secret_env: tuple = ()  # (key, value), sent as docker's --env-file through a pipe, shown as ***
    mounts: tuple = ()  # (host path, container path[, "ro"]); "~/" is the remote user's home
    labels: tuple = ()  # (key, value)
    privileged: bool = False
    entrypoint: str | None = None  # --entrypoint (None keeps the image's, "" clears it)

    def docker_run_argv(self, env_file: str | None = None) -> list[str]:
        argv = ["docker", "run", "-d", "--name", self.name, *DOCKER_RUN_FLAGS]
        if self.privileged:
            argv.append("--privileged")
        for key, value in self.labels:
            argv += ["--label", f"{key}={value}"]
        for key, value in self.env:
            argv += ["-e", f"{key}={value}"]
        if env_file:
            argv += ["--env-file", env_file]
        for mount in self.mounts:
            argv += ["-v", ":".join(mount)]
        if self.entrypoint is not None:
            argv += ["--entrypoint", self.entrypoint]
        return argv + [self.image, "bash", "-c", self.command]

    def shown(self) -> str:
        """The docker run line as --dry-run prints it: secrets as ***."""
        argv = self.docker_run_argv("<secrets>" if self.secret_env else None)
        return remote_join(argv) + "".join(f"\n      secret {k}=***" for k, _ in self.secret_env)


class Step(Record):
    """One thing the launch does, in order: start a container, or wait for a port."""
    action: str  # "start" | "wait_port"
    host: str
    container: ContainerSpec | None = None
    address: str = ""
    port: int = 0
    reason: str = ""

    def describe(self) -> str:
        if self.action == "start":
            return f"[{self.host}] start {self.container.name} ({self.container.role})\n    {self.container.shown()}"
        return f"[{self.host}] wait until {self.address}:{self.port} listens ({self.reason})"


class LaunchContext(Record):
    """What a runtime module gets: the rendered command and everything around it."""
    recipe: Recipe
    values: dict
    serve_command: str  # rendered, one line
    hosts: tuple
    rendezvous: str  # the head's address as the workers should use it
    host_addresses: dict  # host -> the address its peers reach it at
    init_port: int
    ray_port: int
    dashboard: bool
    dashboard_port: int
    make_container: object  # (rank, command, env) -> ContainerSpec
    data_parallel: int = 1
    interface_env: tuple = HOST_INTERFACE_ENV  # names of each host's own network variables

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    def address(self, rank: int) -> str:
        """The address node `rank` uses for the rendezvous (the one it advertises)."""
        return self.host_addresses[self.hosts[rank]]

    def start(self, rank: int, command: str, env: tuple = ()) -> Step:
        """Start node `rank`'s container; `env`: (key, value) the engine needs on that node."""
        return Step("start", self.hosts[rank], self.make_container(rank, command, tuple(env)))

    def wait_port(self, rank: int, address: str, port: int, reason: str) -> Step:
        return Step("wait_port", self.hosts[rank], address=address, port=port, reason=reason)


class LaunchPlan(Record):
    recipe: str
    runtime: str
    model: str
    served_model: str  # "" when only the running engine knows it (llama-server -hf, no --alias)
    cluster_id: str
    hosts: tuple
    port: int
    rendezvous: str
    rendezvous_reason: str
    readiness: str  # "generate" or "models" (embedding and reranker servers)
    steps: tuple
    notes: tuple = ()
    mods: tuple = ()  # (name, local folder), copied to every host before the containers start
    post_exec: tuple = ()  # commands run in the head container once the server is ready
    api_key: str = ""  # the key the server demands (never printed)
    head_address: str = ""  # where the server answers on the head itself (probes through ssh)
    entrypoint: str = ""  # how the image's ENTRYPOINT is handled, named when a start fails

    @property
    def head(self) -> str:
        return self.hosts[0]

    @property
    def endpoint(self) -> str:
        host = self.head.rpartition("@")[2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    @property
    def containers(self) -> list[ContainerSpec]:
        return [s.container for s in self.steps if s.container]

    @property
    def head_container(self) -> ContainerSpec:
        return next(c for c in self.containers if c.role == "head")

    def describe(self) -> str:
        lines = [f"Recipe:      {self.recipe} ({self.runtime})",
                 f"Model:       {self.model} (served as {self.served_model or UNKNOWN_SERVED_NAME})",
                 f"Hosts:       {', '.join(self.hosts)} (head {self.head})",
                 f"Cluster id:  {self.cluster_id}",
                 f"Endpoint:    {self.endpoint}"]
        if self.api_key:
            lines.append("API key:     *** (probed with Authorization: Bearer)")
        if self.entrypoint:
            lines.append(f"Entrypoint:  {self.entrypoint}")
        if len(self.hosts) > 1:
            lines.append(f"Rendezvous:  {self.rendezvous} ({self.rendezvous_reason})")
        lines += [f"Note:        {n}" for n in self.notes]
        lines += ["", "Steps:"] + [f"  {i}. {s.describe()}" for i, s in enumerate(self.steps, 1)]
        return "\n".join(lines)


def resource_package(name: str) -> str:
    """The import name of a module folder beside this file (`runtimes`, `commands`): its installed,
    namespaced name, under which a checkout's folder is registered on first use."""
    package = f"sparkrun_{name}"
    if package not in sys.modules:
        import types

        module = types.ModuleType(package)
        module.__path__ = [str(resource_dir(name))]
        sys.modules[package] = module
    return package


def command_module(name: str):
    """An occasional command's module in commands/ (`benchmark`: benchmark and tune; `lab_setup`:
    setup), imported when that command runs, so the others never pay for it."""
    import importlib

    return importlib.import_module(f"{resource_package('commands')}.{name}")


def load_runtime(name: str):
    """A runtime module: built-in (runtimes/<name>.py) or from the `sparkrun.runtimes` entry points."""
    import importlib

    folder = resource_dir("runtimes")
    module = name.replace("-", "_")
    if (folder / f"{module}.py").is_file():
        return importlib.import_module(f"{resource_package('runtimes')}.{module}")
    from importlib.metadata import entry_points

    for entry in entry_points(group="sparkrun.runtimes"):
        if entry.name == name:
            return entry.load()
    raise UsageError(f"unknown runtime '{name}' (built in: {', '.join(RUNTIMES)})")


def with_metrics_flag(command: str, runtime) -> str:
    """The serve command plus the flag its engine needs to serve /metrics (the runtime's METRICS_FLAG)."""
    flag = getattr(runtime, "METRICS_FLAG", "")
    return f"{command} {flag}" if flag and flag not in command.split() else command


def cluster_id(runtime: str, model: str, hosts, port, served: str) -> str:
    """Stable for the same launch, so a second `run` finds the first."""
    import hashlib

    key = "|".join([runtime, model, ",".join(sorted(hosts)), str(port), served])
    return "sparkrun_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def expand_env(recipe: Recipe, environ=os.environ, allowed=None) -> tuple[list, list]:
    """(plain, secret) env pairs. `${VAR}` and `${VAR:-default}` come from this machine's
    environment; a recipe from a registry reads only the variables in `allowed` (the others
    take their default). Values that read a variable, and names that look like credentials, are
    secrets. HF_TOKEN joins the secrets when it may be read."""
    plain, secret = [], []
    may_read = (lambda name: True) if allowed is None else allowed.__contains__
    for key, raw in recipe.env.items():
        value = format_value(raw) if raw is not None else ""
        read = []

        def fill(match: re.Match) -> str:  # as bash: the default also replaces an empty value
            name, default = match.groups()
            found = environ.get(name) if may_read(name) else None
            if found or (found == "" and default is None):
                read.append(name)
                return found
            if default is not None:
                return default
            if not may_read(name):
                raise UsageError(ENV_NOT_ALLOWED.format(recipe=recipe.name, key=key, name=name, registry=recipe.source,
                                                        file=registries_file()))
            raise UsageError(f"recipe {recipe.name}: env {key} uses ${{{name}}}, which is not set here; "
                             f"export {name}=..., or write ${{{name}:-}} in the recipe to make it optional")

        value = ENV_REF.sub(fill, value)
        if not one_line_value(value):
            raise UsageError(f"recipe {recipe.name}: env {key}: the value read from this machine holds a newline "
                             "or another control character; docker cannot pass it")
        (secret if read or SECRET_NAME.search(key) else plain).append((key, value))
    if environ.get("HF_TOKEN") and "HF_TOKEN" not in recipe.env and may_read("HF_TOKEN"):
        secret.append(("HF_TOKEN", environ["HF_TOKEN"]))
    SECRET_VALUES.update(v for _, v in secret if len(v) >= 4)
    return plain, secret


def nccl_env(facts: HostFacts | None, address: str, per_link: bool = False) -> tuple[list, str]:
    """NCCL/GLOO/UCX variables from this host's own InfiniBand/RoCE facts, and a note. `address`
    is the one this host uses for the rendezvous: the socket variables name its interface.
    `per_link`: the nodes share no CX7 subnet (a ring of direct cables, one subnet per link)."""
    if facts is None:
        return [], "not detected (dry run without --detect)"
    devices = facts.rdma_devices
    socket_if = facts.interface_of(address)
    if not devices:
        socket_if = socket_if or facts.interface_of(facts.management_ip)
        env = [("NCCL_IB_DISABLE", "1")]
        if socket_if:
            env += [("NCCL_SOCKET_IFNAME", socket_if), ("GLOO_SOCKET_IFNAME", socket_if)]
        return env, "no active InfiniBand/RoCE: NCCL uses TCP sockets (slower)"
    socket_if = socket_if or facts.active_ib[0].netdev
    env = [("NCCL_NET", "IB"),
           ("NCCL_IB_DISABLE", "0"),
           ("NCCL_IB_HCA", ",".join(d.hca for d in devices)),
           ("UCX_NET_DEVICES", ",".join(f"{d.hca}:1" for d in devices)),
           ("NCCL_SOCKET_IFNAME", socket_if),
           ("GLOO_SOCKET_IFNAME", socket_if),
           ("NCCL_IGNORE_CPU_AFFINITY", "1")]
    if per_link:
        # Each link its own subnet: NCCL must route by subnet and keep the ports apart.
        env += [("NCCL_IB_SUBNET_AWARE_ROUTING", "1"), ("NCCL_IB_MERGE_NICS", "0")]
    else:
        gid = shared_gid_index(devices)
        if gid is not None:
            env.append(("NCCL_IB_GID_INDEX", str(gid)))
    shown = ", ".join(f"{d.hca} ({d.netdev} {d.ipv4 or 'no address'})" for d in devices)
    return env, f"InfiniBand/RoCE{' per-link subnets' if per_link else ''}: {shown}"


def shared_gid_index(devices: list[IbDevice]) -> int | None:
    """The GID index to pin for every device NCCL_IB_HCA lists: only one they all share. NCCL
    applies NCCL_IB_GID_INDEX to each listed device; a twin that `setup cx7` left without an
    address has no IPv4 RoCE v2 GID at that index, its queue pairs fail (ibv_modify_qp) and the
    handshake hangs (tonyd2wild/DeepSeek-v4-Flash 2x-DGX-Spark issue #38). Unset, NCCL picks the
    RoCE v2 GID of each device itself: the default -1 (NVIDIA/nccl src/transport/net_ib/connect.cc,
    NCCL_PARAM(IbGidIndex, "IB_GID_INDEX", -1)), automatic since NCCL 2.21 (NCCL docs, env.html)."""
    indexes = {d.gid_index for d in devices}
    return indexes.pop() if len(indexes) == 1 and None not in indexes else None


def cx7_per_link(hosts, facts: dict, rendezvous: str) -> bool:
    """True when every node has CX7 addresses but none is on a subnet shared by all (a ring of
    direct cables, one subnet per link): the rendezvous then runs on the management network."""
    head = facts.get(hosts[0])
    return (len(hosts) > 1 and all(facts.get(h) and facts[h].active_ib for h in hosts)
            and head.interface_of(rendezvous) not in {d.netdev for d in head.ib})


def cx7_linked(facts: dict, first: str, second: str) -> bool:
    """Whether the two hosts share an active CX7 subnet (a cable between them, or a switch)."""
    return bool(fabric_route(facts[first], facts[second], second)[1])


def cable_order(hosts, facts: dict) -> list | None:
    """The hosts in an order where each shares a CX7 link with the next and the last with the
    first, the head kept first; None when no order closes a ring. At most 8 hosts, each with two
    CX7 ports: the search stays small."""
    def extend(order: list) -> list | None:
        if len(order) == len(hosts):
            return order if cx7_linked(facts, order[-1], order[0]) else None
        for host in hosts:
            if host not in order and cx7_linked(facts, order[-1], host):
                found = extend(order + [host])
                if found:
                    return found
        return None

    return extend([hosts[0]])


def ring_order_refusal(hosts, facts: dict) -> str | None:
    """Why these hosts, linked per pair, cannot run in the order given, or None. NCCL's ring
    follows the ranks, and each rank's neighbours must be its cable neighbours; three hosts out
    of a four-Spark ring lack the closing link (eugr/spark-vllm-docker docs/NETWORKING.md,
    "Closed rings of four or more Sparks": such a selection is rejected before containers start)."""
    for rank, host in enumerate(hosts):
        following = hosts[(rank + 1) % len(hosts)]
        if not cx7_linked(facts, host, following):
            order = cable_order(hosts, facts)
            fix = (RING_ORDER_FIX.format(order=",".join(order)) if order
                   else RING_NOT_CLOSED.format(count=len(hosts)))
            return RING_ORDER_REFUSED.format(first=host, second=following, fix=fix)
    return None


def solo_refused(recipe: str) -> str:
    return f"recipe {recipe} needs a cluster (cluster_only); --solo cannot run it"


def is_loopback(address: str) -> bool:
    return address in ("localhost", "::1") or address.startswith("127.")


def choose_rendezvous(hosts, facts: dict) -> tuple[str, str, dict]:
    """The head's address that every worker can reach, why, and every host's peer address."""
    head = hosts[0]
    plain = {h: h.rpartition("@")[2] for h in hosts}
    if len(hosts) == 1:
        return plain[head], "single host", plain
    head_facts = facts.get(head)
    if head_facts:
        for dev in head_facts.active_ib:
            subnet = dev.subnet
            peers = {}
            for host in hosts:
                match = next((d.ipv4.split("/")[0] for d in (facts[host].active_ib if facts.get(host) else [])
                              if d.subnet == subnet), None)
                if match:
                    peers[host] = match
            if len(peers) == len(hosts):
                return peers[head], f"InfiniBand/RoCE {dev.netdev}: all nodes on {subnet}", peers
    addresses = {h: (facts[h].management_ip if facts.get(h) else "") or plain[h] for h in hosts}
    if all(is_loopback(a) for a in plain.values()):
        return plain[head], "all hosts are loopback addresses", plain
    if any(is_loopback(a) for a in addresses.values()):
        bad = [h for h in hosts if is_loopback(addresses[h])]
        raise UsageError(f"{bad[0]}: only a loopback address is known for this host, which other nodes "
                         "cannot reach; name hosts by a routable address")
    return addresses[head], "management network (no InfiniBand subnet shared by all nodes)", addresses


class LaunchOptions(Record):
    """What `run` takes from the command line, after parsing."""
    overrides: dict
    image: str | None = None
    cache_dir: str | None = None
    init_port: int | None = None
    ray_port: int | None = None
    dashboard: bool = False
    dashboard_port: int | None = None
    solo: bool = False
    no_sync: bool = False
    pull: bool = False  # docker pull on the head before distribution


def plan_launch(recipe: Recipe, selection: HostSelection, options: LaunchOptions,
                facts: dict | None = None, environ=os.environ, snapshots=(), tuning=None,
                arch: ModelArch | None = None) -> LaunchPlan:
    """Recipe + hosts + options (+ per-host facts when detected, + the snapshots of the repos the
    launch needs when known: repo_needs' order, None for one not known, + tuned MoE configs to
    mount: a TuningMount, section 9, + the model's architecture when known, to refuse a tensor
    parallel size the engine cannot split it over) -> the launch, as data."""
    facts = facts or {}
    values = recipe_values(recipe, options.overrides)
    for key, value in values.items():
        problem = typed_value_problem(key, value)
        if problem:
            raise UsageError(f"{'-o ' if key in options.overrides else f'recipe {recipe.name}: '}{problem}")
    runtime = recipe.runtime
    cluster_only = recipe.cluster_only or recipe.mode == "cluster"
    solo = options.solo or recipe.solo_only or recipe.mode == "solo"
    if options.solo and cluster_only:
        raise UsageError(solo_refused(recipe.name))
    if solo:
        values["tensor_parallel"], values["pipeline_parallel"], values["data_parallel"] = 1, 1, 1
    command = one_line(render_command(recipe, values))
    nodes = 1 if solo else node_count(recipe, values, command)
    module = load_runtime(runtime)
    tensor_parallel = 1 if solo else _whole_number(values, "tensor_parallel")
    refused = tensor_parallel_refusal(module, arch, recipe.model, tensor_parallel)
    if refused:
        raise UsageError(refused)
    if recipe.max_nodes and nodes > recipe.max_nodes:
        raise UsageError(f"recipe {recipe.name} runs on at most {recipe.max_nodes} host(s), but "
                         f"tensor x pipeline x data parallel asks for {nodes}")
    if cluster_only and nodes < 2:
        raise UsageError(f"recipe {recipe.name} needs a cluster (cluster_only); pass --tp 2 or more")
    if nodes > len(selection.hosts):
        raise UsageError(f"recipe {recipe.name} needs {nodes} hosts (one GPU per Spark) but "
                         f"{len(selection.hosts)} {'is' if len(selection.hosts) == 1 else 'are'} given "
                         f"({selection.source}); add hosts or lower --tp")
    hosts = selection.hosts[:nodes]
    port = int(values["port"])
    image = options.image or recipe.container
    if not image:
        raise UsageError(f"recipe {recipe.name} names no container image; pass --image")
    rendezvous, why, peer_addresses = choose_rendezvous(hosts, facts)
    plain_env, secret_env = expand_env(recipe, environ, None if recipe.source == "Local" else registry_allowed_env())
    snapshot = snapshots[0] if snapshots else None
    synced = [(s.need.role, s.need.written, s.container_path(s.gguf_file),
               s.mmproj_file and s.container_path(s.mmproj_file)) for s in snapshots if s and s.gguf_file]
    if synced and hasattr(module, "use_synced_files"):
        command = module.use_synced_files(command, synced)
    command, served, api_key = served_name_and_key(module, command, values, recipe, dict(plain_env + secret_env))
    cid = cluster_id(runtime, recipe.model, hosts, port, served)
    hf_mount = options.cache_dir or "~/.cache/huggingface"
    plain_env += runtime_env_defaults(module, recipe.env)
    cache_mount = compile_cache_mount(module)
    notes = []
    host_env = {}
    per_link = cx7_per_link(hosts, facts, rendezvous)
    refused = per_link and len(hosts) >= 3 and ring_order_refusal(hosts, facts)
    if refused:
        raise UsageError(refused)
    # On a ring of four or more, NCCL's own algorithm choice may connect non-neighbours, which
    # have no link: queue pair timeouts (eugr/spark-vllm-docker docs/NETWORKING.md, "Closed rings
    # of four or more Sparks", whose discovery saves NCCL_ALGO=Ring). Three Sparks are a full mesh.
    ring_env = [("NCCL_ALGO", "Ring")] if per_link and len(hosts) >= 4 else []
    for host in hosts:
        env, note = nccl_env(facts.get(host), peer_addresses[host], per_link)
        host_env[host] = env + ring_env
        if len(hosts) > 1:
            notes.append(f"{host}: {note}")
    mods = resolve_mods(recipe)
    mods_mount = f"{CONTAINER_MODS}/{cid}"
    prefix = [f"( cd {mods_mount}/{name} && WORKSPACE_DIR=\"$workspace\" bash run.sh )" for name, _ in mods]
    prefix += [one_line(c) for c in recipe.pre_exec]
    if mods:
        prefix.insert(0, "workspace=$PWD")
    if snapshot and not options.no_sync:
        plain_env.append(("HF_HUB_OFFLINE", "1"))  # the model is on the host: engines must not reach out
    elif not snapshot and recipe.gguf_quant:
        notes.append(f"model {recipe.model} is not in the local cache yet: run will download and sync it")

    entrypoint, entrypoint_note = container_entrypoint(recipe, image, facts, hosts)

    def make_container(rank: int, cmd: str, engine_env: tuple = ()) -> ContainerSpec:
        host = hosts[rank]
        role = "head" if rank == 0 else f"worker{rank}"
        labels = (("sparkrun.cluster", cid), ("sparkrun.recipe", recipe.name),
                  ("sparkrun.recipe_name", recipe.display_name), ("sparkrun.role", role),
                  ("sparkrun.runtime", runtime), ("sparkrun.port", str(port)), ("sparkrun.head", hosts[0]),
                  ("sparkrun.model", recipe.model), ("sparkrun.served_model", served),
                  ("sparkrun.hosts", ",".join(hosts)))
        computed = (*host_env[host], *engine_env)
        replaced = sorted({key for key, _ in computed if key in recipe.env})
        if replaced:
            notes.append(RECIPE_ENV_WINS.format(host=host, keys=", ".join(replaced)))
        env = [("HF_HOME", CONTAINER_HF_HOME), *plain_env, *((k, v) for k, v in computed if k not in recipe.env)]
        dev = facts.get(host)
        mounts = [(hf_mount, CONTAINER_HF_HOME), *cache_mount]
        if mods:
            mounts.append((f"{REMOTE_MODS}/{cid}", mods_mount, "ro"))
        if tuning:
            mounts.append((tuning.remote, tuning.container, "ro"))
            env.append(tuning.env)
        return ContainerSpec(host=host, name=f"{cid}_{role}", role=role, image=image,
                             command=" && ".join(prefix + [f"{{ {cmd}; }}"]) if prefix else cmd,
                             env=tuple(env), secret_env=tuple(secret_env), mounts=tuple(mounts),
                             labels=labels, privileged=bool(dev and dev.active_ib), entrypoint=entrypoint)

    ctx = LaunchContext(recipe, values, with_metrics_flag(command, module), hosts, rendezvous, peer_addresses,
                        options.init_port or DEFAULT_INIT_PORT.get(runtime, 29501),
                        options.ray_port or DEFAULT_RAY_PORT, options.dashboard,
                        options.dashboard_port or DEFAULT_DASHBOARD_PORT, make_container,
                        1 if solo else data_parallel_size(values, command))
    steps = tuple(module.plan(ctx))
    readiness = "models" if EMBEDDING_HINTS.search(command) else "generate"
    if mods:
        notes.append(f"mods applied in every container before serving: {', '.join(n for n, _ in mods)}")
    if tuning:
        notes.append(tuning.note)
    image_note_text = image_note(image, options.pull, facts, hosts)
    if image_note_text:
        notes.append(image_note_text)
    head_facts = facts.get(hosts[0])
    return LaunchPlan(recipe.name, runtime, recipe.model, served, cid, hosts, port, rendezvous, why,
                      readiness, steps, tuple(notes), tuple(mods),
                      tuple(one_line(c) for c in recipe.post_exec), api_key,
                      (head_facts.management_ip if head_facts else "") or "127.0.0.1", entrypoint_note)


# A recipe's env is what its author asked for: it wins over what sparkrun works out for each
# host (network variables, node addresses), and the plan says so, since a value written for one
# lab's cabling may not fit another's.
RECIPE_ENV_WINS = "{host}: the recipe's own {keys} replace what sparkrun set for this host"


def tensor_parallel_refusal(module, arch: ModelArch | None, model: str, tensor_parallel: int) -> str | None:
    """Why the engine cannot shard the model over `tensor_parallel` ranks (its runtime's
    SPLITS_HEADS rule), or None; None too when the model's head counts are not known."""
    splits = getattr(module, "SPLITS_HEADS", None)
    heads = arch.num_attention_heads if arch else None
    if tensor_parallel <= 1 or splits is None or not heads:
        return None
    kv_heads = arch.num_kv_heads or heads
    if splits(heads, kv_heads, tensor_parallel):
        return None
    sizes = [str(size) for size in range(1, heads + 1) if splits(heads, kv_heads, size)]
    listed = " or ".join(filter(None, [", ".join(sizes[:-1]), sizes[-1]]))
    return TP_HEADS_REFUSED.format(model=model, heads=heads, kv_heads=kv_heads, runtime=module.NAME,
                                   tp=tensor_parallel, sizes=listed)


def served_name_and_key(module, command: str, values: dict, recipe: Recipe, env: dict) -> tuple[str, str, str]:
    """The serve command (with the engine's served-name flag appended when the recipe names a
    served model the command does not set), the name the engine will really serve ("" when
    only the running engine knows it), and the API key it will demand ("" for none)."""
    wanted = values.get("served_model_name")
    engine = getattr(module, "ENGINE", None)
    if engine is None:  # a third-party runtime without engine facts
        return command, str(wanted or recipe.model_repo), ""
    command, served = engine.served_name(command, format_value(wanted) if wanted else None)
    api_key = engine.api_key(command, env)
    if len(api_key) >= 4:
        SECRET_VALUES.add(api_key)
    return command, served or "", api_key


# ENTRYPOINTs known to run their arguments (`exec "$@"`), which must stay: NVIDIA's
# nvidia_entrypoint.sh (NGC images), docker-entrypoint.sh, and inits that forward them (tini,
# dumb-init). Another shell script may do either: a cheap run on the host tells.
PASS_THROUGH_ENTRYPOINT = re.compile(r"(?:^|/)(?:nvidia_entrypoint\.sh|docker-entrypoint\.sh|tini(?:-static)?|dumb-init)$")
SCRIPT_ENTRYPOINT = re.compile(r"\.sh$")
ENTRYPOINT_MARK = "sparkrun-entrypoint-runs-its-arguments"


def entrypoint_check_script(image: str) -> str:
    """Runs on a host: does the image's ENTRYPOINT run `bash -c ...` given as its arguments?
    Only bash prints the arithmetic's result; an entrypoint that echoes its arguments back
    (in a usage error) shows the expression unevaluated. Bounded; the container is removed."""
    probe = f"echo $((40 + 2)){ENTRYPOINT_MARK}"
    return (f"name=sparkrun-entrypoint-check-$$\n"
            f"out=$(timeout 60 docker run --rm --name \"$name\" --network none {shlex.quote(image)} "
            f"bash -c {shlex.quote(probe)} 2>&1)\n"
            "docker rm -f \"$name\" >/dev/null 2>&1\n"
            f"case \"$out\" in *42{ENTRYPOINT_MARK}*) echo passes;; *) echo consumes;; esac\n")


def check_entrypoint(ssh: SSH, host: str, image: str) -> bool:
    """True when the image's ENTRYPOINT runs its arguments (entrypoint_check_script on host)."""
    result = ssh.run(host, entrypoint_check_script(image), check=True, timeout=120,
                     what=f"the ENTRYPOINT check of {image}")
    return result.stdout.strip() == "passes"


def entrypoint_needs_check(recipe: Recipe, image: str, facts: dict, hosts) -> bool:
    """A shell-script ENTRYPOINT the inspect data cannot classify, not yet checked."""
    entry = image_entrypoint(image, facts, hosts)
    return (recipe.entrypoint is None and bool(entry) and checked_entrypoint(image, facts, hosts) is None
            and not PASS_THROUGH_ENTRYPOINT.search(entry[0]) and bool(SCRIPT_ENTRYPOINT.search(entry[0])))


def checked_entrypoint(image: str, facts: dict, hosts) -> bool | None:
    return next((dict(facts[h].entrypoint_checks)[image] for h in hosts
                 if facts.get(h) and image in dict(facts[h].entrypoint_checks)), None)


def image_entrypoint(image: str, facts: dict, hosts) -> list | None:
    """The image's ENTRYPOINT from the probe's inspect data ([] for none), None when no host
    had the image yet."""
    for host in hosts:
        fact = facts.get(host)
        found = fact.image_config(image) if fact else None
        if found is not None:
            return found
    return None


def container_entrypoint(recipe: Recipe, image: str, facts: dict, hosts) -> tuple[str | None, str]:
    """The --entrypoint for the containers (None keeps the image's, "" clears it) and a line
    saying why. Containers run `bash -c COMMAND`: a wrapper ENTRYPOINT ending in `exec "$@"`
    runs it after its setup, one that takes its arguments as its own (vllm/vllm-openai's
    ["vllm", "serve"], ggml's ["/app/llama-server"]) would choke on it, so it is cleared."""
    if recipe.entrypoint is not None:
        return recipe.entrypoint, f"{recipe.entrypoint or '(none)'} (the recipe's entrypoint)"
    entry = image_entrypoint(image, facts, hosts)
    if entry is None:
        return None, f"the image's own ({image} not inspected yet)"
    if not entry:
        return None, ""
    shown = json.dumps(entry)
    checked = checked_entrypoint(image, facts, hosts)
    flags_only = all(a.startswith("-") for a in entry[1:])
    if checked or (checked is None and PASS_THROUGH_ENTRYPOINT.search(entry[0]) and flags_only):
        return None, f"{shown} from {image}, kept: it runs its arguments"
    if checked is None and SCRIPT_ENTRYPOINT.search(entry[0]) and flags_only:
        return None, f"{shown} from {image}, kept until a run on the head shows what it does"
    return "", (f"{shown} from {image} cleared: it would take sparkrun's `bash -c` as its own "
                "arguments (set 'entrypoint:' in the recipe to override)")


def runtime_env_defaults(module, recipe_env: dict) -> list[tuple[str, str]]:
    """The runtime's default env and its compile-cache variables, except those the recipe sets."""
    cache_env = {var: f"{CONTAINER_COMPILE_CACHE}/{sub}" for var, sub in getattr(module, "CACHES", {}).items()}
    return [(k, v) for k, v in {**getattr(module, "ENV", {}), **cache_env}.items() if k not in recipe_env]


def compile_cache_mount(module) -> list[tuple[str, str]]:
    """The host's compile-cache folder of the runtime's engine, as a mount (none without caches)."""
    if not getattr(module, "CACHES", None):
        return []
    return [(f"{REMOTE_COMPILE_CACHE}/{module.CACHE_ENGINE}", CONTAINER_COMPILE_CACHE)]


def resolve_mods(recipe: Recipe) -> list[tuple[str, Path]]:
    """(name, local folder) of each of the recipe's mods: from its registry's (or eugr's) mods
    folder, or a `mods/` folder beside or above a recipe file. A missing mod stops the launch."""
    if not recipe.mods:
        return []
    names = [Path(str(m)).name for m in recipe.mods]
    if any(n in ("", ".", "..") for n in names):
        raise UsageError(f"recipe {recipe.name}: mods must name folders, not {recipe.mods!r}")
    places = [recipe.path.parent / "mods", recipe.path.parent.parent / "mods", recipe.path.parent.parent.parent / "mods"]
    registries = {e["name"]: e for e in load_registry_config()["registries"]} if recipe.source != "Local" else {}
    if recipe.source in registries:  # a registry's recipe: only mods inside its clone, or eugr's
        clone = clone_path(registries[recipe.source]["clone"])
        places = [p for p in places if inside(p, clone)]
    registry_dir = registry_mods_dir(recipe)
    if registry_dir:
        places.insert(0, registry_dir)

    def found(place: Path, name: str) -> bool:
        return (place / name / "run.sh").is_file() and inside(place / name / "run.sh", place)

    for place in places:
        if all(found(place, n) for n in names):
            return [(n, place / n) for n in names]
    missing = [n for n in names if not any(found(p, n) for p in places)]
    raise UsageError(f"recipe {recipe.name}: mod(s) {', '.join(missing)} not found (looked in "
                     f"{', '.join(str(p) for p in places if p.is_dir()) or 'no mods folder'}); add the "
                     f"registry that has them (eugr's: sparkrun registry add "
                     f"https://github.com/eugr/spark-vllm-docker.git) or put them in a mods/ folder beside the recipe")


# ---------------------------------------------------------------------------
# 9. Execution: preflight, launch, readiness, distribution, stop, logs, status
# ---------------------------------------------------------------------------

HOME_PREFIX = "~/"
READY_POLL_S = (0.2, 1.0)  # seconds between readiness checks: first minute, then on
HEAD_PROBE_EVERY_S = 2.0  # while the endpoint does not answer from here, ask the head this often
SERVED_NAME_GRACE_S = 5.0  # a server listing only other names this long will not change its mind
START_SETTLE_S = 60  # how long a rollback waits for `docker run`s still in flight
UNKNOWN_SERVED_NAME = "the name the engine lists"
UNAUTHORIZED_HINT = (" (Unauthorized: the server wants an API key; put it in the command's --api-key or the "
                     "engine's API key variable in the recipe's env)")
SERVED_NAME_MISMATCH = ("{head}: {endpoint}/models lists {listed}, never {served}; set the recipe's "
                        "served_model_name (or -o served_model_name=NAME) to the name the server serves")
ONLY_THROUGH_HEAD = ("{endpoint} does not answer from this machine but does on {head}: "
                     "waiting through the ssh connection")


def remote_join(argv: list[str]) -> str:
    """shlex.join, except that a leading "~/" in an argument (or before ':' in a mount) expands
    to the remote user's $HOME."""
    parts = []
    for arg in argv:
        if arg.startswith(HOME_PREFIX):
            parts.append('"$HOME"/' + shlex.quote(arg[len(HOME_PREFIX):]))
        else:
            parts.append(shlex.quote(arg))
    return " ".join(parts)


ENV_PIPE = "SPARKRUN_ENV_PIPE"  # stands for the secrets' --env-file in the docker run argv


def start_container_script(spec: ContainerSpec) -> tuple[str, bytes]:
    """(script, data that follows it on stdin) to `docker run` the container on its host, after
    creating the folders it mounts writable (docker would create them as root). The secrets are
    that data: docker reads them as its --env-file from a pipe, so they never reach
    the host's disk, a command line or the script that -vv prints, and nothing is left behind
    whatever happens to the connection. The script is one function called on its last line, with
    `exit` on that same line: bash has read all of it before `head` reads the data, and never
    reads the data as commands."""
    docker_run = remote_join(spec.docker_run_argv(ENV_PIPE if spec.secret_env else None))
    data = "".join(f"{key}={value}\n" for key, value in spec.secret_env).encode()
    if data:
        docker_run = docker_run.replace(f" {ENV_PIPE} ", f" <(head -c {len(data)}) ")
    folders = remote_join(["mkdir", "-p", *(m[0] for m in spec.mounts if m[2:] != ("ro",))])
    return f"start() {{\n{folders}\n{docker_run}\n}}\nstart; exit\n", data


def start_container(ssh: SSH, spec: ContainerSpec, timeout: float) -> RemoteResult:
    script, secrets = start_container_script(spec)
    return ssh.run(spec.host, script, stdin_data=secrets, check=True, timeout=timeout,
                   what=f"docker run of {spec.name}")


def wait_port_script(address: str, port: int, container: str, timeout_s: int) -> str:
    """Runs on the host: wait until address:port accepts, or fail early if the container died."""
    return f"""\
for i in $(seq {timeout_s * 2}); do
  (exec 3<>/dev/tcp/{address}/{port}) 2>/dev/null && exit 0
  [ "$(docker inspect --format '{{{{.State.Running}}}}' {shlex.quote(container)} 2>/dev/null)" = true ] || exit 3
  sleep 0.5
done
exit 4
"""


def container_logs_tail(ssh: SSH, host: str, name: str, lines: int = 20) -> str:
    try:
        result = ssh.run(host, f"docker logs --tail {lines} {shlex.quote(name)} 2>&1\n", timeout=30)
    except HostError:
        return ""
    return result.stdout.rstrip()


class SignalsHeld:
    """Ctrl+C, SIGTERM and SIGHUP are ignored inside: a rollback under way finishes."""

    def __enter__(self):
        import signal

        self.previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def __exit__(self, *exc):
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# How long `docker stop` lets an engine shut down before docker kills it. The engines unlink
# their POSIX shared memory (the host's /dev/shm under --ipc host: on a Spark, GPU memory) only
# when they shut down; `docker rm -f` is SIGKILL, which leaves it there until reboot
# (vllm-project/vllm#51317). On SIGTERM vLLM's API server gives its engine core 5 s to shut down
# (vllm-project/vllm#31252), which gives its workers 4 s (vllm-project/vllm#43154), and SGLang's
# launcher then kills its process tree; docker's own default of 10 s (docs.docker.com,
# `docker container stop`) would leave little beyond that. An engine that exits promptly ends
# the wait at once: only one that ignores SIGTERM costs the whole grace.
STOP_GRACE_S = 15


def remove_script(names: list[str], grace: int) -> str:
    """`docker stop -t grace` (SIGTERM, then SIGKILL after grace seconds; docker stops them in
    parallel), then `docker rm -f`; grace 0: `docker rm -f` alone."""
    quoted = " ".join(map(shlex.quote, names))
    stop = f"docker stop -t {grace} {quoted} >/dev/null 2>&1\n" if grace else ""
    return f"{stop}docker rm -f {quoted} >/dev/null 2>&1 || true\n"


def remove_containers(ssh: SSH, names_by_host: dict, grace: int = STOP_GRACE_S) -> dict:
    """Stop (remove_script) and remove containers on every host at once, in one round trip per
    host; no signal interrupts it. Returns host -> names of the hosts that could not be reached:
    those containers may still be there."""
    with SignalsHeld():
        results = ssh.run_all([h for h, names in names_by_host.items() if names],
                              lambda h: remove_script(names_by_host[h], grace), timeout=grace + 60)
    return {h: names_by_host[h] for h, r in results.items() if isinstance(r, HostError) or r.returncode == 255}


def left_behind_message(recipe: str, left: dict) -> str:
    """What to do about containers on hosts that were lost before they could be removed."""
    where = "; ".join(f"{h}: {', '.join(names)}" for h, names in left.items())
    return (f"containers possibly left on hosts that could not be reached ({where}); once they are back, "
            f"run: sparkrun stop {recipe} -H {','.join(left)}")


def already_running_message(plan: LaunchPlan, hosts) -> str:
    return (f"{plan.recipe} is already running as {plan.cluster_id} on {', '.join(sorted(hosts))}; stop it first "
            f"(sparkrun stop {plan.recipe}) or pass --replace")


def preflight(plan: LaunchPlan, facts: dict, replace: bool) -> list[str]:
    """Problems found before anything starts; names of this launch's running containers to replace."""
    problems, existing = [], []
    for host in plan.hosts:
        fact = facts[host]
        if isinstance(fact, HostError):
            problems.append(str(fact))
            continue
        if fact.docker_error:
            problems.append(f"{host}: {docker_problem(fact.docker_error)}")
            continue
        ours = [c for c in fact.containers if label_map(c).get("sparkrun.cluster") == plan.cluster_id]
        existing += [(host, c["Names"]) for c in ours]
        if ours:
            continue  # its ports are this launch's own; --replace frees them
        for port, what in sorted(plan_ports(plan, host)):
            if fact.port_busy(port):
                problems.append(f"{host}: port {port} ({what}) is already in use; stop what uses it, "
                                f"or pass {'--port' if what == 'serve' else '--' + what.replace(' ', '-') + '-port'}")
    if existing and not replace:
        problems.insert(0, already_running_message(plan, {h for h, _ in existing}))
    if problems:
        raise SparkrunError("\n       ".join(problems))
    return existing


MTU_MISMATCH = ("CX7 MTU differs on {subnet}: {ports}; RDMA between these hosts can hang without an error "
                "(a firmware update can reset a port to 1500): run 'sparkrun setup cx7 -H {hosts}', or {fixes}")


def mtu_mismatches(plan: LaunchPlan, facts: dict) -> list[str]:
    """One line per CX7 subnet whose ports on this launch's hosts have different MTUs: large RDMA
    transfers then fail (IBV_WC_RETRY_EXC_ERR) and tensor parallel hangs silently."""
    ports_by_subnet: dict[str, list[tuple[str, str, int]]] = {}
    for host in plan.hosts:
        fact = facts.get(host)
        for dev in fact.active_ib if isinstance(fact, HostFacts) else ():
            if dev.mtu:
                ports_by_subnet.setdefault(str(dev.subnet), []).append((host, dev.netdev, dev.mtu))
    lines = []
    for subnet, ports in ports_by_subnet.items():
        highest = max(mtu for _, _, mtu in ports)
        if len({host for host, _, _ in ports}) < 2 or all(mtu == highest for _, _, mtu in ports):
            continue
        fixes = "; ".join(f"on {host}: ip link set dev {netdev} mtu {highest}"
                          for host, netdev, mtu in ports if mtu < highest)
        lines.append(MTU_MISMATCH.format(subnet=subnet, ports=", ".join(f"{h} {n} {m}" for h, n, m in ports),
                                         hosts=",".join(plan.hosts), fixes=fixes))
    return lines


def memory_need(estimate: VramEstimate, fraction, total: int | None) -> tuple[float | None, str]:
    """What a host must have free, and why: an engine given gpu_memory_utilization reserves that
    fraction of the GPU's total at start (vLLM's worker refuses to start when less is free: "Free
    memory on device ... is less than desired GPU memory utilization", vllm/v1/worker/gpu_worker.py);
    otherwise the estimate's weights and KV cache per GPU."""
    if isinstance(fraction, (int, float)) and 0 < fraction <= 1 and total:
        return fraction * total, f"gpu_memory_utilization {fraction:g} of {total / GIB:.1f} GB"
    if estimate.per_gpu_bytes:
        return estimate.per_gpu_bytes, "weights and KV cache"
    return None, ""


def gpu_memory_holders(fact: HostFacts, cluster: str) -> list[str]:
    """What holds memory on a host besides this launch: running containers (other sparkrun
    launches and anything else) and the processes nvidia-smi lists."""
    holders = []
    for container in fact.containers:
        labels = label_map(container)
        if container.get("State") == "running" and labels.get("sparkrun.cluster") != cluster:
            holders.append(f"container {container.get('Names')} (sparkrun: {labels.get('sparkrun.recipe', '?')})")
    holders += [f"container {c.get('Names')} (not sparkrun's, image {c.get('Image')})"
                for c in fact.other_containers]
    holders += [f"process {pid} ({mib / 1024:.1f} GB)" for pid, mib in fact.gpu_processes]
    return holders


# Shared memory (/proc/meminfo Shmem) cannot be reclaimed: files an engine left in /dev/shm when it
# was killed (SIGKILL: docker rm -f, a crash) stay there, out of MemAvailable, until reboot.
LEFT_IN_DEV_SHM = ("an engine killed without a graceful stop (stop --force, a crash) leaves its files in /dev/shm "
                   "(psm_*, sem.mp-*, vllm_*, VLLM_*) until reboot: remove them (ls -la /dev/shm) or reboot")
SHARED_MEMORY_HELD = "no container or GPU process holds it, but {size:.1f} GB is shared memory (Shmem): " + LEFT_IN_DEV_SHM
SHARED_MEMORY_NOTE_MIB = 2048  # status names the host's shared memory from this size on


def shared_memory_note(host: str, shmem_mib: int, containers_running: bool) -> str:
    """Status's line about a host's shared memory; with no container running, how to free it."""
    note = f"{host}: shared memory (Shmem) holds {shmem_mib / 1024:.1f} GB, which the GPU cannot use"
    return note + (" (running containers may be using it)" if containers_running else f"; {LEFT_IN_DEV_SHM}")


def memory_shortfalls(plan: LaunchPlan, facts: dict, estimate: VramEstimate, fraction, skip=()) -> list[str]:
    """One line per host whose available memory (MemAvailable: a Spark's GPU shares it) is below
    what the launch needs there. Hosts in `skip` are left out (their memory is this launch's own)."""
    lines = []
    for host in plan.hosts:
        fact = facts.get(host)
        if not isinstance(fact, HostFacts) or fact.mem_available_mib is None or host in skip:
            continue
        need, why = memory_need(estimate, fraction, fact.gpu_total_bytes)
        available = fact.mem_available_mib * 2**20
        if need is None or need <= available:
            continue
        holders = gpu_memory_holders(fact, plan.cluster_id)
        shmem = (fact.shmem_mib or 0) * 2**20
        if holders:
            held = f"held by {', '.join(holders)}; stop what you do not need"
        elif available + shmem >= need:  # what is missing sits in /dev/shm
            held = SHARED_MEMORY_HELD.format(size=shmem / GIB)
        else:
            held = "no container or GPU process holds it; free memory on the host"
        lines.append(f"{host}: needs {need / GIB:.1f} GB ({why}) but {available / GIB:.1f} GB is available, "
                     f"{held}, or lower --gpu-mem")
    return lines


def plan_ports(plan: LaunchPlan, host: str) -> set:
    ports = {(plan.port, "serve")} if host == plan.head else set()
    for step in plan.steps:
        if step.action == "wait_port" and step.host == host:
            ports.add((step.port, "ray" if "Ray" in step.reason else "init"))
    return ports


def label_map(container: dict) -> dict:
    """docker ps JSON prints labels as 'k=v,k2=v2'."""
    labels = container.get("Labels") or ""
    if isinstance(labels, dict):
        return labels
    return dict(item.partition("=")[::2] for item in labels.split(",") if item)


def request_headers(api_key: str) -> dict:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def http_json(url: str, payload: dict | None = None, timeout: float = 3.0, api_key: str = ""):
    import urllib.request

    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers=request_headers(api_key))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def head_http_json(ssh: SSH, host: str, url: str, payload: dict | None = None, timeout: float = 3.0,
                   api_key: str = ""):
    """http_json made by curl on `host`, through its ssh connection: for an endpoint that only
    the host itself reaches. Headers travel in the script (stdin), never in an argv."""
    import urllib.error

    headers = "".join(f"{k}: {v}\n" for k, v in request_headers(api_key).items())
    data = ["--data-binary", json.dumps(payload)] if payload is not None else []
    curl = ["curl", "-sS", "-m", str(int(timeout) or 1), "-H", "@-", *data, "-w", "\n%{http_code}", url]
    script = f"{shlex.join(curl)} <<'SPARKRUN_HEADERS'\n{headers}SPARKRUN_HEADERS\n"
    result = ssh.run(host, script, timeout=timeout + 30)
    if not result.ok:
        raise OSError(f"curl on {host}: {result.stderr_tail(1) or f'exit {result.returncode}'}")
    body, _, code = result.stdout.rpartition("\n")
    if code != "200":
        raise urllib.error.HTTPError(url, int(code) if code.isdigit() else 0, body[:200], None, None)
    return json.loads(body)


class ServerProbe(Record):
    """One look at the server: why it is not ready ('' when it is), whether it answered HTTP at
    all, and the model names /v1/models lists."""
    why: str
    answered: bool = False
    listed: tuple = ()


def probe_server(fetch, served: str, readiness: str) -> ServerProbe:
    """fetch(path, payload, timeout) -> JSON. `served` "" takes the first name listed."""
    import urllib.error

    try:
        models = fetch("/models", None, 3.0)
    except urllib.error.HTTPError as exc:
        return ServerProbe(f"/v1/models answers HTTP {exc.code}" + (UNAUTHORIZED_HINT if exc.code == 401 else ""), True)
    except (OSError, ValueError) as exc:
        return ServerProbe(f"not answering ({getattr(exc, 'reason', exc)})")
    ids = tuple(str(m.get("id")) for m in (models.get("data") or []) if isinstance(m, dict))
    name = served or (ids[0] if ids else "")
    if not name or name not in ids:
        return ServerProbe(f"serving {', '.join(ids) or 'no model'} (waiting for {served or 'a model'})", True, ids)
    if readiness == "models":
        return ServerProbe("", True, ids)
    try:
        answer = fetch("/completions", {"model": name, "prompt": "Hello", "max_tokens": 1}, 120)
    except (OSError, ValueError) as exc:
        return ServerProbe(f"lists the model but cannot generate yet ({getattr(exc, 'reason', exc)})", True, ids)
    return ServerProbe("" if answer.get("choices") else "lists the model but returned no completion", True, ids)


def probe_ready(plan_endpoint: str, served: str, readiness: str, api_key: str = "") -> str:
    """'' when ready, else why not yet."""
    return probe_server(lambda path, payload, timeout: http_json(plan_endpoint + path, payload, timeout, api_key),
                        served, readiness).why


class Readiness(Record):
    """How a launch became ready: the name the server serves, and whether the endpoint only
    answered through the head's ssh connection."""
    served: str
    through_head: bool = False


def wait_until_ready(plan: LaunchPlan, ssh: SSH, timeout_s: float, progress, guard: MemoryGuard) -> Readiness:
    """Poll until the server generates (or lists the model, for embedding servers). When the
    endpoint does not answer from here, the head is asked too, through its ssh connection; a
    server that keeps listing other names than the expected one fails fast. Every 5 s the
    containers and the hosts' memory are checked (check_still_running, guard)."""
    started = time.monotonic()
    deadline = started + timeout_s
    names = {c.host: [] for c in plan.containers}
    for spec in plan.containers:
        names[spec.host].append(spec.name)
    direct = lambda path, payload, timeout: http_json(plan.endpoint + path, payload, timeout, plan.api_key)
    head_url = f"http://{plan.head_address}:{plan.port}/v1"
    via_head = lambda path, payload, timeout: head_http_json(ssh, plan.head, head_url + path, payload, timeout,
                                                             plan.api_key)
    fetch, through_head = direct, False
    last_check = last_head_try = 0.0
    wrong_name_since = None
    while True:
        now = time.monotonic()
        probe = probe_server(fetch, plan.served_model, plan.readiness)
        if not probe.answered and not through_head and now - last_head_try > HEAD_PROBE_EVERY_S:
            last_head_try = now
            from_head = probe_server(via_head, plan.served_model, plan.readiness)
            if from_head.answered:
                fetch, through_head, probe = via_head, True, from_head
                progress(ONLY_THROUGH_HEAD.format(endpoint=plan.endpoint, head=plan.head))
        if not probe.why:
            return Readiness(plan.served_model or probe.listed[0], through_head)
        if probe.listed and plan.served_model and plan.served_model not in probe.listed:
            wrong_name_since = wrong_name_since or now
            if now - wrong_name_since >= SERVED_NAME_GRACE_S:
                raise SparkrunError(SERVED_NAME_MISMATCH.format(head=plan.head, endpoint=plan.endpoint,
                                                                listed=", ".join(probe.listed), served=plan.served_model))
        else:
            wrong_name_since = None
        if now - last_check > 5:
            last_check = now
            check_still_running(plan, ssh, names, guard)
            progress(probe.why)
        if now > deadline:  # the log now: the containers are removed after this
            tail = container_logs_tail(ssh, plan.head, plan.head_container.name)
            raise SparkrunError(not_ready_message(plan.head, timeout_s, probe.why, tail))
        time.sleep(READY_POLL_S[0] if now - started < 60 else READY_POLL_S[1])


def not_ready_message(head: str, timeout_s: float, why: str, tail: str) -> str:
    return (f"{head}: not ready after {timeout_s:.0f} s ({why}); the containers are removed; "
            "last log lines of the head:\n" + indented_tail(tail))


def indented_tail(tail: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in tail.splitlines()[-lines:]) or "    (no output)"


# The memory guard while the engines start. A GB10 whose available memory collapses during weight
# loading, profiling or CUDA-graph capture can hang until it is power-cycled: vllm-project/vllm#46307
# last saw ~7 GiB available before the host wedged, a guard in vllm-project/vllm#56824 stopped the
# engine at 6.27 GiB. DGX OS's earlyoom (`-m 2 -s 80`, as the established sparkrun's `setup
# earlyoom` sets it) SIGTERMs one engine process at 2 % (~2.4 GiB of a Spark's 121.7 GiB), one rank
# only. The default floor, 5 % of MemTotal (6.1 GiB on a Spark), sits above earlyoom's, so sparkrun
# stops every host's engines gracefully before earlyoom kills one, and near the figures seen just
# before a wedge. Recipes mostly ask gpu_memory_utilization 0.7 to 0.85, which leaves a Spark 18 GiB
# or more beside the engine; at 0.9 (12 GiB for the system and the engine's own processes) the
# floor may stop a launch: --memory-floor lowers it. Two checks in a row (5 s apart) below it stop
# the launch; one low sample (a transient) does not.
MEMORY_FLOOR_FRACTION = 0.05
MEMORY_LOW_CHECKS = 2
MEMORY_GUARD_STOPPED = ("available memory fell to {available:.1f} GB (floor {floor:.1f} GB) while the engine was "
                        "starting; the launch is stopped before the host runs out (a DGX Spark's GPU shares this "
                        "memory): lower --gpu-mem or --max-model-len, or set the floor with --memory-floor GB (0: off)")


class MemoryGuard(Record, mutable=True):
    """Fails a launch when a host's MemAvailable stays below the floor for MEMORY_LOW_CHECKS checks
    in a row. floor_gb: None for MEMORY_FLOOR_FRACTION of each host's MemTotal; 0 for no guard."""
    floor_gb: float | None = None
    low_checks: dict = {}  # host -> checks in a row below its floor

    def check(self, host: str, available_kib: int, total_kib: int) -> None:
        floor = total_kib * 1024 * MEMORY_FLOOR_FRACTION if self.floor_gb is None else self.floor_gb * GIB
        available = available_kib * 1024
        self.low_checks[host] = self.low_checks.get(host, 0) + 1 if available < floor else 0
        if self.low_checks[host] >= MEMORY_LOW_CHECKS:
            raise RemoteFailed(host, MEMORY_GUARD_STOPPED.format(available=available / GIB, floor=floor / GIB))


def check_still_running(plan: LaunchPlan, ssh: SSH, names: dict, guard: MemoryGuard) -> None:
    """Whether every container still runs, and each host's memory for the guard: one round trip per host."""
    script = lambda h: "".join(
        f"printf '%s %s\\n' {shlex.quote(n)} \"$(docker inspect --format '{{{{.State.Running}}}}' {shlex.quote(n)} 2>/dev/null)\"\n"
        for n in names[h]) + READ_MEMINFO + 'echo "@@memory $available $total"\n'
    for host, result in raise_first(ssh.run_all(list(names), script, timeout=30)).items():
        memory = []
        for line in result.stdout.splitlines():
            name, _, running = line.partition(" ")
            if name == "@@memory":
                memory = running.split()
            elif running.strip() != "true":
                tail = container_logs_tail(ssh, host, name)
                raise RemoteFailed(host, f"container {name} exited before the server was ready; last log lines:\n"
                                         + indented_tail(tail))
        if len(memory) == 2 and all(f.isdigit() for f in memory):  # none when meminfo is unreadable
            guard.check(host, int(memory[0]), int(memory[1]))


def step_batches(steps) -> list[list[Step]]:
    """Consecutive starts on different hosts go together (in parallel); each wait alone."""
    batches: list[list[Step]] = []
    for step in steps:
        last = batches[-1] if batches else None
        if (step.action == "start" and last and last[0].action == "start"
                and step.host not in {s.host for s in last}):
            last.append(step)
        else:
            batches.append([step])
    return batches


def raise_first(results: dict) -> dict:
    """Per-host results (from in_parallel or SSH.run_all) when no host failed; otherwise every
    failed host's error is printed but one, which is raised (main prints it, sets the exit code)."""
    errors = [r for r in results.values() if isinstance(r, HostError)]
    for error in errors[1:]:
        print(mask(f"Error: {error}"), file=sys.stderr)
    if errors:
        raise errors[0]
    return results


NAME_TAKEN = "is already in use by container"  # docker run's Conflict error for a name in use


def execute_launch(plan: LaunchPlan, ssh: SSH, *, ready_timeout: float, say,
                   memory_floor: float | None = None) -> tuple[float, Readiness]:
    """Start each step in order (consecutive starts on different hosts at once), then wait
    until ready (memory_floor: MemoryGuard's floor_gb); returns the seconds spent waiting for
    the server (rendezvous ports included) and how it became ready. A failure before the
    endpoint is ready removes every container this launch started on every host. So does Ctrl+C, SIGTERM or SIGHUP before every container
    has started (once the `docker run`s in flight have ended, bounded); after that, a signal
    raises Detached and the job keeps running."""
    started: dict[str, list[str]] = {}
    in_flight: list[threading.Event] = []  # set once each `docker run` has returned
    waited = 0.0
    try:
        for batch in step_batches(plan.steps):
            if batch[0].action == "start":
                for step in batch:
                    say(f"[{step.host}] starting {step.container.role} ({step.container.name})")
                    started.setdefault(step.host, []).append(step.container.name)
                specs = {s.host: s.container for s in batch}
                results = in_parallel(list(specs), lambda h: start_container(ssh, specs[h], timeout=120),
                                      running=in_flight)
                taken = [h for h, r in results.items() if isinstance(r, RemoteFailed) and NAME_TAKEN in str(r)]
                for host in taken:  # the same launch, started by another `run` a moment ago: not ours
                    started[host].remove(specs[host].name)
                if taken:
                    raise SparkrunError(already_running_message(plan, taken))
                raise_first(results)
                continue
            step = batch[0]
            say(f"[{step.host}] waiting for {step.address}:{step.port} ({step.reason})")
            owner = next(s.container.name for s in plan.steps if s.host == step.host and s.container)
            since = time.monotonic()
            result = ssh.run(step.host, wait_port_script(step.address, step.port, owner, 600), timeout=660)
            waited += time.monotonic() - since
            if result.returncode == 3:
                raise RemoteFailed(step.host, f"container {owner} exited while waiting for {step.reason}; "
                                              "last log lines:\n" + container_logs_tail(ssh, step.host, owner))
            if result.returncode == 4:
                raise RemoteFailed(step.host, f"{step.address}:{step.port} ({step.reason}) did not open in 600 s")
            if not result.ok:
                raise Unreachable(step.host, f"lost the connection while waiting for {step.address}:{step.port} "
                                             f"({result.stderr_tail(1) or f'exit {result.returncode}'})")
    except KeyboardInterrupt as interrupt:
        roll_back(ssh, started, in_flight, interrupt, plan.recipe)
    except SparkrunError as failure:
        raise rolled_back_failure(ssh, started, failure, plan) from None
    try:
        say(f"waiting for {plan.endpoint} to serve {plan.served_model or UNKNOWN_SERVED_NAME}")
        since = time.monotonic()
        readiness = wait_until_ready(plan, ssh, ready_timeout, lambda why: say(f"  not ready yet: {why}"),
                                     MemoryGuard(memory_floor))
        return waited + time.monotonic() - since, readiness
    except KeyboardInterrupt as interrupt:
        raise Detached(interrupt) from None
    except SparkrunError as failure:
        raise rolled_back_failure(ssh, started, failure, plan) from None


class LaunchInterrupted(SparkrunError):
    """A launch rolled back on a signal; exits as the signal would."""

    def __init__(self, message: str, interrupt: KeyboardInterrupt):
        super().__init__(message)
        self.exit_code = signal_exit_code(interrupt)


def roll_back(ssh: SSH, started: dict, in_flight: list, interrupt: KeyboardInterrupt, recipe: str) -> None:
    """Remove what a launch started, after waiting (bounded) for the `docker run`s still in
    flight, which would otherwise create their containers after the removal."""
    with SignalsHeld():
        pending = [done for done in in_flight if not done.is_set()]
        if pending:
            say(f"Interrupted: waiting up to {START_SETTLE_S} s for {len(pending)} container start(s) in flight ...")
            deadline = time.monotonic() + START_SETTLE_S
            for done in pending:
                done.wait(max(0.0, deadline - time.monotonic()))
        say(f"Interrupted: stopping the containers this launch started (up to {STOP_GRACE_S} s) ...")
        left = remove_containers(ssh, started)
    if left:
        raise LaunchInterrupted(f"launch interrupted; {left_behind_message(recipe, left)}", interrupt) from None
    still = [done for done in in_flight if not done.is_set()]
    if still:
        raise LaunchInterrupted(f"launch interrupted; {len(still)} container start(s) still had not finished after "
                                f"{START_SETTLE_S} s and may have left a container: check with 'sparkrun status'",
                                interrupt) from None
    raise LaunchInterrupted("launch interrupted before every container had started; nothing was left running",
                            interrupt) from None


def rolled_back_failure(ssh: SSH, started: dict, failure: SparkrunError, plan: LaunchPlan) -> SparkrunError:
    """Remove what the launch started; the failure, naming what may be left on hosts that were lost."""
    left = remove_containers(ssh, started)
    failure = failure_with_hint(failure_with_entrypoint(failure, plan), plan)
    return SparkrunError(f"{failure}; {left_behind_message(plan.recipe, left)}") if left else failure


def failure_with_entrypoint(failure: SparkrunError, plan: LaunchPlan) -> SparkrunError:
    """A container that died names how its image's ENTRYPOINT was handled."""
    if plan.entrypoint and "exited" in str(failure) and "entrypoint" not in str(failure):
        failure.args = (f"{failure}\n    (entrypoint: {plan.entrypoint})",)
    return failure


def failure_with_hint(failure: SparkrunError, plan: LaunchPlan) -> SparkrunError:
    """A failure the runtime recognizes (its FAILURE_HINTS) ends with what to do about it."""
    for pattern, hint in getattr(load_runtime(plan.runtime), "FAILURE_HINTS", ()):
        if pattern.search(str(failure)):
            failure.args = (f"{failure}\n    hint: {hint}",)
            break
    return failure


def follow_logs(ssh: SSH, host: str, name: str, tail: str = "50", follow: bool = True) -> int:
    """Stream a container's log through the host's master connection; Ctrl+C only detaches.
    The remote side ends as soon as we do: it watches its stdin, which we hold open."""
    logs = shlex.join(["docker", "logs", *(["-f"] if follow else []), "--tail", tail, name])
    # A background job's stdin is /dev/null unless redirected: hand it ours through fd 3.
    script = (f"exec 3<&0\n{logs} 2>&1 </dev/null & logs=$!\n"
              "( cat <&3 >/dev/null; kill $logs 2>/dev/null ) >/dev/null 2>&1 &\n"
              "wait $logs\n")
    remote = ["bash", "-c", script]
    argv = remote if host in LOCAL_HOSTS else ssh.argv(host, [shlex.join(remote)], stream=True)
    process = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.stdin.close()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def find_workloads(ssh: SSH, hosts, *, recipe: tuple | None = None, port: int | None = None,
                   role: str | None = None) -> dict:
    """host -> list of sparkrun containers (docker ps JSON), found by their labels; `recipe`: the
    names a launch may be labelled with (launch_names)."""
    filters = ["--filter", "label=sparkrun.cluster"]
    if port:
        filters += ["--filter", f"label=sparkrun.port={port}"]
    if role:
        filters += ["--filter", f"label=sparkrun.role={role}"]
    script = shlex.join(["docker", "ps", "-a", "--no-trunc", *filters, "--format", "{{json .}}"]) + "\n"
    found = {}
    for host, result in raise_first(ssh.run_all(list(hosts), script, timeout=SSH_CONNECT_TIMEOUT + 20)).items():
        if not result.ok:
            raise RemoteFailed(host, docker_problem(result.stderr))
        containers = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
        found[host] = [c for c in containers if not recipe or set(recipe) & recipe_labels(c)]
    return found


def recipe_labels(container: dict) -> set:
    labels = label_map(container)
    return {labels.get("sparkrun.recipe"), labels.get("sparkrun.recipe_name")} - {None}


def record_pending(what: str, hosts) -> Path:
    """Note an operation in flight (a download or transfer) for `status`; remove when done."""
    folder = cache_dir() / "pending"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}-{time.monotonic_ns()}.json"
    atomic_write(path, json.dumps({"pid": os.getpid(), "what": what, "hosts": list(hosts),
                                   "started": time.time()}))
    return path


def pending_operations() -> list[dict]:
    """Operations whose process still runs; stale records (dead PID) are removed."""
    folder = cache_dir() / "pending"
    alive = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            entry = None
        well_formed = (isinstance(entry, dict) and isinstance(entry.get("pid"), int)
                       and isinstance(entry.get("what"), str) and isinstance(entry.get("hosts"), list))
        if well_formed and process_alive(entry["pid"]):
            alive.append(entry)
        else:
            path.unlink(missing_ok=True)
    return alive


# -- Image and model distribution. Each repo and the image come from the best source: a host that
# already has them, else this machine, else a download (here, or on the head). This machine sends
# each byte at most once per launch, to one host; the hosts then copy to each other over their
# CX7 addresses, logging in with the keys `setup ssh` installs.

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5", ".npz")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")
TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
GGUF_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # llama.cpp's split files: NAME-00001-of-00003.gguf
LOGIN_FAILURE = re.compile(r"Permission denied|Host key verification failed|Connection (refused|timed out|closed)|"
                           r"No route to host|Could not resolve hostname|kex_exchange")


def fast_path_hint(hosts) -> str:
    return (f"the hosts cannot log in to each other, so this machine sends each copy itself; run "
            f"'sparkrun setup ssh -H {','.join(hosts)}' once to let them copy over their CX7 links")


class RepoNeed(Record):
    """A Hugging Face repo that every host of a launch needs in its cache."""
    repo: str
    role: str = "model"  # "model", "draft model" or "tokenizer"
    revision: str | None = None
    gguf_quant: str | None = None
    gguf_defaults: tuple = ()  # a GGUF repo named without a quant: the quants the engine looks for, in order

    @property
    def cache_name(self) -> str:
        return "models--" + self.repo.replace("/", "--")

    @property
    def written(self) -> str:
        """The repo as the recipe or its command names it: `org/name`, or `org/name:QUANT`."""
        return f"{self.repo}:{self.gguf_quant}" if self.gguf_quant else self.repo

    @property
    def gguf(self) -> bool:
        return bool(self.gguf_quant or self.gguf_defaults)

    @property
    def projector(self) -> bool:
        """Whether the repo's multimodal projector comes along: the model's does, a draft's does not
        (llama.cpp's common/arg.cpp fetches and loads the projector of the -hf repo only)."""
        return self.role == "model"

    @property
    def wanted(self) -> str:
        """What the repo must hold, for messages: the quant(s), else the role's files."""
        return self.gguf_quant or " or ".join(self.gguf_defaults) or self.role

    @property
    def ref(self) -> str:
        return self.revision or "main"

    @property
    def label(self) -> str:
        return self.repo if self.role == "model" else f"{self.repo} ({self.role})"

    def download_patterns(self) -> list[str] | None:
        """What to download of the repo: one quant (and the multimodal projector) of a GGUF
        repo, the tokenizer files of a tokenizer repo, else everything."""
        if self.gguf:
            quants = (self.gguf_quant,) if self.gguf_quant else self.gguf_defaults
            return [pattern for q in quants for pattern in
                    (f"*{q}*.gguf", f"*{q.lower()}*.gguf", f"*{q}*/*.gguf", f"*{q.lower()}*/*.gguf")
                    ] + (["*mmproj*.gguf"] if self.projector else [])
        return TOKENIZER_PATTERNS if self.role == "tokenizer" else None

    def gguf_weights(self, paths) -> list[str]:
        """The GGUF files the engine loads of those present, in order (split shards included): the
        quant's, else the first of gguf_defaults present, else the first model file's."""
        models = sorted(p for p in paths if p.endswith(".gguf") and not is_mmproj(p))
        for quant in (self.gguf_quant,) if self.gguf_quant else self.gguf_defaults:
            chosen = [p for p in models if gguf_quant_match(p, quant)]
            if chosen:
                return chosen
        if self.gguf_quant or not models:
            return []
        first = GGUF_SHARD.sub("", models[0])
        return [p for p in models if GGUF_SHARD.sub("", p) == first]


def main_need(recipe: Recipe) -> RepoNeed:
    """The recipe's model. Under a runtime with GGUF_QUANTS every model is a GGUF repo: named
    without a quant, it needs only the file the engine would pick, not every quant the repo holds."""
    defaults = () if recipe.gguf_quant else tuple(getattr(load_runtime(recipe.runtime), "GGUF_QUANTS", ()))
    return RepoNeed(recipe.model_repo, "model", recipe.model_revision, recipe.gguf_quant, gguf_defaults=defaults)


def repo_needs(recipe: Recipe, command: str) -> list[RepoNeed]:
    """The recipe's model, then every other repo its command names through the runtime's
    REPO_FLAGS (draft models, tokenizers). Local paths are not repos. When the runtime has
    GGUF_QUANTS, those flags name GGUF repos as `org/name[:QUANT]`; without a quant, the engine
    looks for GGUF_QUANTS in turn, else takes the repo's first model file."""
    needs = [main_need(recipe)]
    module = load_runtime(recipe.runtime)
    flags = getattr(module, "REPO_FLAGS", {})
    gguf_defaults = tuple(getattr(module, "GGUF_QUANTS", ()))
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for index, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag not in flags:
            continue
        if not eq:
            value = words[index + 1] if index + 1 < len(words) else ""
        role, json_key = flags[flag]
        if json_key:
            try:
                value = json.loads(value).get(json_key, "")
            except (ValueError, AttributeError):
                continue
        if not isinstance(value, str):
            continue
        repo, _, quant = value.partition(":") if gguf_defaults else (value, "", "")
        if HF_REPO_ID.fullmatch(repo) and all(n.written != value for n in needs):
            needs.append(RepoNeed(repo, role, gguf_quant=quant or None, gguf_defaults=() if quant else gguf_defaults))
    return needs


def is_mmproj(path: str) -> bool:
    return path.rpartition("/")[2].lower().startswith("mmproj") and path.endswith(".gguf")


class SnapshotCopy(Record):
    """What one Hugging Face cache (here or on a host) holds of a repo's snapshot."""
    revision: str
    files: dict  # path inside the snapshot -> size
    shards: frozenset = frozenset()  # the weight files its safetensors index names

    def usable(self, need: RepoNeed) -> dict | None:
        """The files a launch takes from this snapshot; None when it is no usable copy: shards
        missing (an interrupted download), no weights at all (the lone config.json that `show`
        and `recipe vram` leave behind), no tokenizer in a tokenizer repo, no file of the quant."""
        if need.gguf:
            weights = need.gguf_weights(self.files)
            projectors = [p for p in self.files if is_mmproj(p)] if need.projector else []
            return {p: self.files[p] for p in weights + projectors} if weights else None
        if need.role == "tokenizer":
            return self.files if any(p.rpartition("/")[2] in TOKENIZER_FILES for p in self.files) else None
        if not any(p.endswith(WEIGHT_SUFFIXES) for p in self.files) or not self.shards <= self.files.keys():
            return None
        return self.files


def local_copy(home: Path, need: RepoNeed) -> SnapshotCopy | None:
    snapshot = cached_snapshot_dir(home, need.repo, need.revision)
    if snapshot is None:
        return None
    try:
        files = {p.relative_to(snapshot).as_posix(): p.stat().st_size for p in snapshot.rglob("*") if not p.is_dir()}
    except OSError:
        return None  # a link whose blob never arrived
    shards = {name for index in snapshot.glob("*.safetensors.index.json")
              for name in ((_read_json(index) or {}).get("weight_map") or {}).values()}
    return SnapshotCopy(snapshot.name, files, frozenset(shards))


class ModelSnapshot(Record):
    """A repo's snapshot as a launch takes it: the files, and where the local copy sits."""
    repo: str
    revision: str  # commit hash
    ref: str  # the name refs/ maps to it ("main" or the recipe's model_revision)
    repo_dir: Path  # <hf_home>/hub/models--org--name (here; it may exist only on a host)
    files: tuple  # (path inside the snapshot, size)
    gguf_file: str | None = None  # first GGUF shard, for llama.cpp's -m
    mmproj_file: str | None = None  # a GGUF repo's multimodal projector, for --mmproj
    label: str = ""
    need: RepoNeed | None = None  # what the launch asked of the repo

    @property
    def cache_name(self) -> str:
        return self.repo_dir.name

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)

    def container_path(self, relative: str) -> str:
        return f"{CONTAINER_HF_HOME}/hub/{self.cache_name}/snapshots/{self.revision}/{relative}"


def make_snapshot(need: RepoNeed, copy: SnapshotCopy | None, home: Path) -> ModelSnapshot | None:
    files = copy.usable(need) if copy else None
    if files is None:
        return None
    ordered = tuple(sorted(files.items()))
    weights = [p for p, _ in ordered if not is_mmproj(p)]
    projectors = [p for p, _ in ordered if is_mmproj(p)]
    return ModelSnapshot(need.repo, copy.revision, need.ref, home / "hub" / need.cache_name, ordered,
                         weights[0] if need.gguf else None, projectors[0] if projectors else None, need.label, need)


def local_snapshots(needs: list[RepoNeed], home: Path) -> list[ModelSnapshot | None]:
    """Each repo from the local cache if it is complete there (else None); never contacts the Hub."""
    return [make_snapshot(need, local_copy(home, need), home) for need in needs]


def local_snapshot(recipe: Recipe, home: Path) -> ModelSnapshot | None:
    """The recipe's model from the local cache if it is complete there; never contacts the Hub."""
    return local_snapshots([main_need(recipe)], home)[0]


def nothing_downloaded(need: RepoNeed, where: str = "") -> str:
    hint = ", or name the quant (repo:QUANT)" if need.gguf_defaults else ""
    return (f"download of {need.repo}{where} finished but no {need.wanted} files were found in it; "
            f"check the recipe's model name{hint}")


def model_missing_message(need: RepoNeed, home: Path, hosts=()) -> str:
    where = f", nor on {', '.join(hosts)}," if hosts else ""
    return (f"model {need.repo} is not in the local Hugging Face cache ({home}/hub){where} and the Hub "
            f"cannot be reached from here; copy the model's cache folder (hub/{need.cache_name}) into "
            f"{home}/hub, point --cache-dir or HF_HOME at a cache that has it, or pass --no-sync if the "
            f"hosts already have it")


def hub_client_env() -> dict:
    """The Hub settings of this machine that a download elsewhere should use too."""
    return {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_TOKEN") if os.environ.get(k)}


def download_here(need: RepoNeed, home: Path) -> ModelSnapshot:
    """Download the repo into the local cache (online only); its snapshot."""
    if hub_offline():
        raise SparkrunError(model_missing_message(need, home))
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    say(f"Downloading {need.label} into {home}/hub ...")
    pending = record_pending(f"download {need.repo}", ["this machine"])
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(need.repo, revision=need.revision, cache_dir=str(home / "hub"),
                          allow_patterns=need.download_patterns())
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the library raises many types; the message is what matters
        raise SparkrunError(f"download of {need.repo} failed: {str(exc).splitlines()[0][:300]}") from None
    finally:
        pending.unlink(missing_ok=True)
    snapshot = make_snapshot(need, local_copy(home, need), home)
    if snapshot is None:
        raise SparkrunError(nothing_downloaded(need))
    return snapshot


def head_download_script(need: RepoNeed, root: str) -> str:
    """Download on a host with its Hub client, into its cache: the same layout and revision as a
    download here (the Hub client writes blobs, snapshot links and refs)."""
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ETAG_TIMEOUT": "10", **hub_client_env()}
    call = (f"snapshot_download({need.repo!r}, revision={need.revision!r}, "
            f"cache_dir=os.path.join(os.path.expanduser('~'), {root!r}, 'hub'), "
            f"allow_patterns={need.download_patterns()!r})")
    return ("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()) +
            "python3 - <<'PY'\nimport os, sys\ntry:\n    from huggingface_hub import snapshot_download\n"
            "except ImportError:\n    sys.exit('huggingface_hub is not installed for python3 (pip install huggingface_hub)')\n"
            f"try:\n    {call}\nexcept Exception as exc:\n    sys.exit(str(exc).splitlines()[0][:300])\nPY\n")


def remote_cache_root(cache_dir_option: str | None) -> str:
    """The hosts' HF cache as rsync and scripts name it: relative to the remote home by default."""
    return cache_dir_option.rstrip("/") if cache_dir_option else ".cache/huggingface"


def quote_path(path: str) -> str:
    """A remote path for a script: relative paths are under the remote $HOME."""
    return shlex.quote(path) if path.startswith("/") else '"$HOME"/' + shlex.quote(path)


SURVEY_FUNCTION = r"""survey() {  # cache folder, ref, revision (empty: the ref's)
  local dir="$root/hub/$1" rev=$3 foreign
  echo "@@repo $1"
  [ -d "$dir" ] || return 0
  foreign=$(find "$dir" ! -user "$me" -print -quit 2>/dev/null)
  [ -n "$foreign" ] && echo "@@foreign $foreign"
  [ -n "$rev" ] || read -r rev < "$dir/refs/$2" 2>/dev/null  # a ref file has no final newline
  [ -n "$rev" ] || rev=$2
  [ -d "$dir/snapshots/$rev" ] || return 0
  echo "@@revision $rev"
  cd "$dir/snapshots/$rev" || return 0
  find -L . -type f -printf '%P\t%s\n' 2>/dev/null
  for index in *.safetensors.index.json; do
    [ -f "$index" ] && grep -o '"[^"]*\.safetensors"' "$index" | sort -u | sed 's/^"/@@shard /; s/"$//'
  done
  cd - >/dev/null
}
"""


class HostCache(Record):
    """One host's Hugging Face cache, as far as a launch's repos go."""
    free: int  # bytes available
    copies: dict  # cache folder -> SnapshotCopy
    foreign: dict  # cache folder -> a path in it the ssh user does not own


def survey_script(wanted: list[tuple[RepoNeed, str]], root: str) -> str:
    """Free space and, per (repo, revision or ""), what the host holds of it."""
    calls = "".join(f"survey {shlex.quote(n.cache_name)} {shlex.quote(n.ref)} {shlex.quote(rev)}\n"
                    for n, rev in wanted)
    return (f"root={quote_path(root)}\nme=$(id -u)\nmkdir -p \"$root/hub\" 2>/dev/null\n"
            "{ read -r _; read -r _ _ _ free _; } < <(df -PB1 \"$root/hub\" 2>/dev/null)\n"
            "echo \"@@free ${free:-0}\"\n" + SURVEY_FUNCTION + calls)


def parse_survey(output: str) -> HostCache:
    free, copies, foreign = 0, {}, {}
    name, revision, files, shards = None, None, {}, set()

    def close():
        if name and revision:
            copies[name] = SnapshotCopy(revision, dict(files), frozenset(shards))

    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word == "@@free":
            free = int(rest) if rest.isdigit() else 0
        elif word == "@@repo":
            close()
            name, revision, files, shards = rest, None, {}, set()
        elif word == "@@foreign":
            foreign[name] = rest
        elif word == "@@revision":
            revision = rest
        elif word == "@@shard":
            shards.add(rest)
        elif "\t" in line:
            path, _, size = line.rpartition("\t")
            if size.isdigit():
                files[path] = int(size)
    close()
    return HostCache(free, copies, foreign)


def survey_hosts(ssh: SSH, hosts, wanted: list[tuple[RepoNeed, str]], root: str) -> dict:
    results = raise_first(ssh.run_all(list(hosts), survey_script(wanted, root), timeout=60))
    return {h: parse_survey(r.stdout) for h, r in results.items()}


def holds(cache: HostCache, snapshot: ModelSnapshot) -> bool:
    copy = cache.copies.get(snapshot.cache_name)
    return bool(copy) and copy.revision == snapshot.revision and all(
        copy.files.get(path) == size for path, size in snapshot.files)


def missing_bytes(cache: HostCache, snapshot: ModelSnapshot) -> int:
    copy = cache.copies.get(snapshot.cache_name)
    have = copy.files if copy and copy.revision == snapshot.revision else {}
    return sum(size for path, size in snapshot.files if have.get(path) != size)


def fix_permissions_message(host: str, path: str, cache_dir_option: str | None) -> str:
    cache = f" --cache-dir {cache_dir_option}" if cache_dir_option else ""
    return (f"the Hugging Face cache holds files this user does not own ({path}; containers write it as "
            f"root), so the copy would fail; run: sparkrun setup fix-permissions -H {host}{cache}")


def disk_full_message(needed: int, free: int, root: str) -> str:
    return (f"not enough free disk for the model copy: {needed / GIB:.2f} GB to copy, {free / GIB:.2f} GB "
            f"free under {root}; free some space there or pass --cache-dir")


def check_room(surveys: dict, snapshots: list[ModelSnapshot], root: str, cache_dir_option: str | None) -> None:
    """Before copying: every target must have room, and a cache the ssh user owns."""
    errors = {}
    for host, cache in surveys.items():
        lacking = [s for s in snapshots if not holds(cache, s)]
        foreign = next((cache.foreign[s.cache_name] for s in lacking if s.cache_name in cache.foreign), None)
        needed = sum(missing_bytes(cache, s) for s in lacking)
        if foreign:
            errors[host] = RemoteFailed(host, fix_permissions_message(host, foreign, cache_dir_option))
        elif needed > cache.free:
            errors[host] = RemoteFailed(host, disk_full_message(needed, cache.free, root))
    raise_first(errors)


class Copy(Record):
    """One copy of a repo or an image to a host: from this machine (source "") or from a host,
    to the target's address as the source reaches it."""
    source: str
    target: str
    address: str
    bind: str = ""  # the source's own address on that network (ssh -o BindAddress)

    @property
    def origin(self) -> str:
        return self.source or "this machine"


def fabric_route(source: HostFacts | None, target: HostFacts | None, target_host: str) -> tuple[str, str]:
    """(the target's address, the source's address) on a CX7 subnet both share; else the
    target's name as given and no binding."""
    for mine in (source.active_ib if source else []):
        for theirs in (target.active_ib if target else []):
            if theirs.subnet == mine.subnet:
                return theirs.ipv4.split("/")[0], mine.ipv4.split("/")[0]
    return target_host.rpartition("@")[2], ""


def plan_copies(lacking: list[str], holders: list[str], facts: dict) -> list[list[Copy]]:
    """Rounds of copies: with no host holding it, this machine sends one copy (to the first
    host lacking it); then the holders share out the other hosts, over the fabric, in parallel."""
    lacking, holders, rounds = list(lacking), list(holders), []
    if lacking and not holders:
        seed = lacking.pop(0)
        rounds.append([Copy("", seed, seed.rpartition("@")[2])])
        holders = [seed]
    if lacking:
        rounds.append([Copy(holders[i % len(holders)], target,
                            *fabric_route(facts.get(holders[i % len(holders)]), facts.get(target), target))
                       for i, target in enumerate(lacking)])
    return rounds


def peer_ssh_command(ssh: SSH, copy: Copy) -> list[str]:
    """The ssh a host runs to reach another: no prompts, the target's key as `setup ssh` recorded
    it (under the name it was given), from the source's own CX7 address."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
            "-o", f"HostKeyAlias={copy.target.rpartition('@')[2]}"]
    if copy.bind:
        argv += ["-o", f"BindAddress={copy.bind}"]
    user = ssh.user or (copy.target.partition("@")[0] if "@" in copy.target else None)
    return argv + (["-l", user] if user else [])


def through_peer(command: str) -> str:
    """A script line that ends with a host's own ssh to another: its exit 255 (ssh's own
    failure) becomes 86, so that it is not taken for a failure of our connection to the host."""
    return f"{command}\nrc=$?; [ $rc -eq 255 ] && rc=86; exit $rc\n"


def snapshot_list_script(snapshot: ModelSnapshot, root: str) -> str:
    """On a host that holds the snapshot: cd into its cache folder and write to $list the paths
    that make a complete cache entry there (ref, snapshot links, the blobs they point at)."""
    files = "\n".join(path for path, _ in snapshot.files)
    return (f"cd {quote_path(root)}/hub/{shlex.quote(snapshot.cache_name)} || exit 1\n"
            f"rev={shlex.quote(snapshot.revision)}\nlist=$(mktemp)\ntrap 'rm -f \"$list\"' EXIT\nhere=$(pwd -P)\n"
            f"[ -f refs/{shlex.quote(snapshot.ref)} ] && echo refs/{shlex.quote(snapshot.ref)} >> \"$list\"\n"
            "while IFS= read -r f; do\n  echo \"snapshots/$rev/$f\"\n  t=$(readlink -f \"snapshots/$rev/$f\")\n"
            "  case $t in \"$here\"/*) echo \"${t#\"$here\"/}\";; esac\ndone >> \"$list\" <<'FILES'\n"
            f"{files}\nFILES\n")


def rsync_file_list(snapshot: ModelSnapshot) -> list[str]:
    """Paths under models--org--name/ that make a complete cache entry: the ref, the snapshot
    links and the blobs they point at (so the HF layout is intact on the host)."""
    entries = {f"refs/{snapshot.ref}"} if (snapshot.repo_dir / "refs" / snapshot.ref).exists() else set()
    for relative, _ in snapshot.files:
        link = snapshot.repo_dir / "snapshots" / snapshot.revision / relative
        entries.add(f"snapshots/{snapshot.revision}/{relative}")
        if link.is_symlink():
            target = (link.parent / os.readlink(link)).resolve()
            entries.add(target.relative_to(snapshot.repo_dir.resolve()).as_posix())
    return sorted(entries)


def rsync_sent(output: str) -> int:
    return int((re.search(r"Total bytes sent: ([\d,]+)", output) or [0, "0"])[1].replace(",", ""))


class Distribution:
    """The copies of one launch: who sends what to whom, and the one-time hint."""

    def __init__(self, ssh: SSH, facts: dict, hosts, root: str = ""):
        self.ssh, self.facts, self.hosts, self.root = ssh, facts, list(hosts), root
        self.hinted = False

    def hint_once(self) -> None:
        if not self.hinted:
            self.hinted = True
            warn(fast_path_hint(self.hosts))

    def run_rounds(self, rounds: list[list[Copy]], copy_one, local_fallback) -> None:
        """Each round in parallel. A host-to-host copy whose login fails is sent by
        `local_fallback(targets)` instead (this machine, or relayed through it), after one hint."""
        for copies in rounds:
            by_target = {c.target: c for c in copies}
            results = in_parallel(list(by_target), lambda target: copy_one(by_target[target]))
            refused = [t for t, r in results.items() if isinstance(r, LoginRefused)]
            raise_first({t: r for t, r in results.items() if t not in refused})
            if refused:
                self.hint_once()
                local_fallback(refused)

    def model(self, snapshot: ModelSnapshot, holders: list[str], lacking: list[str], local: bool) -> None:
        """Copy one snapshot to the hosts lacking it."""
        say(f"Model {snapshot.label} ({snapshot.size / GIB:.2f} GB) -> {', '.join(lacking)}"
            f" (from {', '.join(holders) if holders else 'this machine'})")
        pending = record_pending(f"model {snapshot.repo}", lacking)
        try:
            self.run_rounds(plan_copies(lacking, holders, self.facts),
                            lambda c: self.copy_model(snapshot, c),
                            lambda targets: self.model_fallback(snapshot, holders, targets, local))
        finally:
            pending.unlink(missing_ok=True)

    def copy_model(self, snapshot: ModelSnapshot, copy: Copy) -> int:
        start = time.monotonic()
        if copy.source:
            script = snapshot_list_script(snapshot, self.root) + through_peer(shlex.join(
                ["rsync", "-a", "--partial", "--stats", "--files-from=LIST", "-e",
                 shlex.join(peer_ssh_command(self.ssh, copy)), "./",
                 f"{copy.address}:{self.root}/hub/{snapshot.cache_name}/"]).replace("LIST", '"$list"'))
            result = self.ssh.run(copy.source, script, timeout=24 * 3600)
            if not result.ok:
                if LOGIN_FAILURE.search(result.stderr):
                    raise LoginRefused(copy.target, result.stderr_tail(1))
                raise RemoteFailed(copy.target, f"model copy from {copy.source} failed (rsync exit "
                                                f"{result.returncode}): {result.stderr_tail(2)}; run again to resume")
            sent = rsync_sent(result.stdout)
        else:
            sent = self.push_model(snapshot, copy.target)
        elapsed = time.monotonic() - start
        via = f" over {copy.address}" if copy.source else ""
        say(f"[{copy.target}] model synced from {copy.origin}{via}: {sent / 2**20:.1f} MiB in {elapsed:.1f} s "
            f"({sent / 2**20 / max(elapsed, 1e-3):.0f} MiB/s)")
        return sent

    def push_model(self, snapshot: ModelSnapshot, host: str) -> int:
        """rsync from the local cache, resumable, over the host's master connection."""
        listing = cache_dir() / f"rsync-{os.getpid()}-{threading.get_ident()}.list"
        atomic_write(listing, "\n".join(rsync_file_list(snapshot)) + "\n")
        try:
            argv = ["rsync", "-a", "--partial", "--stats", f"--files-from={listing}", "-e", self.ssh.rsync_shell(),
                    f"{snapshot.repo_dir}/", f"{host}:{self.root}/hub/{snapshot.cache_name}/"]
            if self.ssh.verbose >= 2:
                print(f"[{host}] {shlex.join(argv)}", file=sys.stderr)
            done = subprocess.run(argv, capture_output=True, text=True)
        finally:
            listing.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RemoteFailed(host, f"model transfer failed (rsync exit {done.returncode}): "
                                     f"{' | '.join(done.stderr.strip().splitlines()[-2:])}; run again to resume")
        return rsync_sent(done.stdout)

    def model_fallback(self, snapshot: ModelSnapshot, holders: list[str], targets: list[str], local: bool) -> None:
        """Without host-to-host logins: this machine sends from its cache, or relays a holder's copy."""
        if local:
            raise_first(in_parallel(targets, lambda t: self.copy_model(snapshot, Copy("", t, t))))
            return
        source = holders[0] if holders else next(h for h in self.hosts if h not in targets)
        tar = snapshot_list_script(snapshot, self.root) + 'tar -cf - -T "$list"\n'
        unpack = f"mkdir -p {quote_path(self.root)}/hub/{shlex.quote(snapshot.cache_name)} && cd \"$_\" && tar -xf -"
        stream_to_hosts(self.ssh, self.ssh.argv(source, ["bash", "-c", shlex.quote(tar)], stream=True),
                        targets, ["bash", "-c", shlex.quote(unpack)], what=f"model {snapshot.repo}")


    def copy_image(self, image: str, copy: Copy) -> int:
        """One image copy: this machine's `docker save` streamed into the target, or the
        source host's streamed over the fabric."""
        if not copy.source:
            return stream_to_hosts(self.ssh, ["docker", "save", image], [copy.target], ["docker", "load"])[copy.target]
        start = time.monotonic()
        load = shlex.join([*peer_ssh_command(self.ssh, copy), "--", copy.address, "docker", "load"])
        result = self.ssh.run(copy.source, through_peer(f"set -o pipefail\ndocker save {shlex.quote(image)} | {load}"),
                              timeout=24 * 3600)
        if not result.ok:
            if LOGIN_FAILURE.search(result.stderr):
                raise LoginRefused(copy.target, result.stderr_tail(1))
            raise RemoteFailed(copy.target, f"image copy from {copy.source} failed: {result.stderr_tail(2)}")
        say(f"[{copy.target}] image received from {copy.source} over {copy.address} in {time.monotonic() - start:.1f} s")
        return 0

    def image_fallback(self, image: str, holders: list[str], targets: list[str], local: bool) -> None:
        """Without host-to-host logins: one `docker save` here (or on a holder, relayed through
        this machine) streamed to every target at once."""
        source = [] if local else self.ssh.argv(holders[0], ["docker", "save", image], stream=True)
        stream_to_hosts(self.ssh, source or ["docker", "save", image], targets, ["docker", "load"])


class LoginRefused(HostError):
    """A host could not log in to another (no `setup ssh` yet)."""


def sync_snapshot(ssh: SSH, snapshot: ModelSnapshot, facts: dict, hosts, root: str) -> None:
    """Copy a snapshot of the local cache to the hosts lacking it."""
    surveys = survey_hosts(ssh, hosts, [(RepoNeed(snapshot.repo, revision=snapshot.ref), snapshot.revision)], root)
    lacking = [h for h in hosts if not holds(surveys[h], snapshot)]
    if lacking:
        Distribution(ssh, facts, hosts, root).model(snapshot, [h for h in hosts if h not in lacking], lacking, local=True)


def distribute_models(dist: Distribution, needs: list[RepoNeed], *, home: Path, cache_dir_option: str | None,
                      download_on: str) -> list[ModelSnapshot]:
    """Every repo the launch needs onto every host, each from its best source: a host that holds
    it, this machine, a download. Returns the snapshots, the main model first."""
    ssh, hosts, root = dist.ssh, dist.hosts, dist.root
    local = local_snapshots(needs, home)
    surveys = survey_hosts(ssh, hosts, [(n, s.revision if s else "") for n, s in zip(needs, local)], root)
    plans = []
    for need, snapshot in zip(needs, local):
        here = bool(snapshot)
        if snapshot is None:
            snapshot = next((s for h in hosts
                             if (s := make_snapshot(need, surveys[h].copies.get(need.cache_name), home))), None)
        if snapshot is None:
            snapshot, here = obtain(ssh, need, hosts, home=home, root=root, download_on=download_on)
        plans.append((need, snapshot, here))
    # The hosts were asked about the local revision, else the ref's; ask again for another reference.
    again = [(n, s.revision) for (n, s, _), cached in zip(plans, local) if not cached]
    if again:
        for host, cache in survey_hosts(ssh, hosts, again, root).items():
            surveys[host].copies.update(cache.copies)
            surveys[host].foreign.update(cache.foreign)
    check_room(surveys, [s for _, s, _ in plans], root, cache_dir_option)
    for need, snapshot, here in plans:
        holders = [h for h in hosts if holds(surveys[h], snapshot)]
        lacking = [h for h in hosts if h not in holders]
        if lacking:
            dist.model(snapshot, holders, lacking, local=here)
        else:
            say(f"Model {snapshot.label}: already on every host")
    return [s for _, s, _ in plans]


def obtain(ssh: SSH, need: RepoNeed, hosts, *, home: Path, root: str, download_on: str) -> tuple[ModelSnapshot, bool]:
    """A repo nobody has, downloaded: here, or on the head with its Hub client (--download-on
    head, or when the Hub cannot be reached from here unless HF_HUB_OFFLINE says to stay
    offline). Returns the snapshot and whether it is here."""
    head = hosts[0]
    if download_on == "here" or (download_on == "auto" and (not hub_offline() or hub_forbidden())):
        return download_here(need, home), True
    say(f"Downloading {need.label} on {head} ...")
    pending = record_pending(f"download {need.repo}", [head])
    try:
        result = ssh.run(head, head_download_script(need, root), timeout=24 * 3600)
    finally:
        pending.unlink(missing_ok=True)
    if not result.ok:
        raise SparkrunError(f"{model_missing_message(need, home, hosts)}; the download on {head} failed too: "
                            f"{result.stderr_tail(1)}")
    survey = survey_hosts(ssh, [head], [(need, "")], root)[head]
    snapshot = make_snapshot(need, survey.copies.get(need.cache_name), home)
    if snapshot is None:
        raise SparkrunError(nothing_downloaded(need, f" on {head}"))
    return snapshot, False


# -- Page cache: a Spark's GPU shares memory with the page cache, which a model copy just filled.
# Drop it (root, or `sudo -n tee`: the rule `setup clear-cache --save-sudo` saves), else evict only
# the model's files (`dd iflag=nocache count=0` is coreutils' posix_fadvise(POSIX_FADV_DONTNEED) on
# the whole file, no root needed).

PAGE_CACHE_SH = r'''
sync
if [ "$(id -u)" = 0 ]; then
  printf '3\n' 2>/dev/null > TARGET && { echo "@@page-cache dropped"; exit 0; }
elif printf '3\n' | sudo -n "$(command -v tee)" TARGET >/dev/null 2>&1; then
  echo "@@page-cache dropped"; exit 0
fi
evicted=0 failed=0
while IFS= read -r -d '' file; do
  if dd if="$file" iflag=nocache count=0 status=none 2>/dev/null; then
    evicted=$((evicted + 1))
  else
    failed=$((failed + 1))
  fi
done < <(find -L SNAPSHOT -type f -print0 2>/dev/null)
if [ $evicted -gt 0 ] && [ $failed = 0 ]; then echo "@@page-cache evicted $evicted"
else echo "@@page-cache failed"; fi
'''
PAGE_CACHE_UNFREED = ("could not free the page cache on {hosts} (no root or sudo rule to drop it, and the model's "
                      "files could not be evicted); the engine sees less free memory: run 'sparkrun setup "
                      "clear-cache --save-sudo' once, or pass --no-drop-cache")


def page_cache_script(snapshots, root: str) -> str:
    """PAGE_CACHE_SH for the launch's synced repos (None for one not synced): find walks each."""
    folders = [f"{quote_path(root)}/hub/{shlex.quote(s.cache_name)}/snapshots/{shlex.quote(s.revision)}"
               for s in snapshots if s]
    return PAGE_CACHE_SH.replace("TARGET", drop_caches_target()).replace("SNAPSHOT", " ".join(folders) or "/nonexistent")


def free_page_cache(ssh: SSH, hosts, snapshots, root: str) -> dict[str, str]:
    """On every host at once: drop the page cache, else evict the synced repos' files from it (the
    model, and a draft model or tokenizer the command names). Returns host -> what happened
    ("dropped", "evicted N files" or "failed"), timed when -v; one warning names the hosts where
    neither worked."""
    results = raise_first(ssh.run_all(list(hosts), page_cache_script(snapshots, root), timeout=300))
    outcomes = {}
    for host, result in results.items():
        found = re.search(r"@@page-cache (dropped|evicted (\d+)|failed)", result.stdout)
        outcomes[host] = (f"evicted {found[2]} model files" if found[2] else found[1]) if found else "failed"
        if ssh.verbose:
            say(f"[{host}] page cache: {outcomes[host]} ({result.elapsed:.2f} s)")
    unfreed = [h for h, outcome in outcomes.items() if outcome == "failed"]
    if unfreed:
        warn(PAGE_CACHE_UNFREED.format(hosts=", ".join(unfreed)))
    return outcomes


def sync_mods(ssh: SSH, plan: LaunchPlan) -> None:
    """Copy the recipe's mod folders to every host, where containers mount them read-only."""
    mirror_folders(ssh, plan.hosts, [str(path) for _, path in plan.mods],
                   f"{REMOTE_MODS.removeprefix(HOME_PREFIX)}/{plan.cluster_id}", "mods")


def mirror_folders(ssh: SSH, hosts, sources: list[str], remote: str, what: str) -> None:
    """rsync -a --delete of local folders to `remote` (under the remote home unless absolute) on
    every host at once, over the hosts' master connections."""
    def push(host):
        ssh.run(host, f"mkdir -p {quote_path(remote)}\n", check=True, what=f"mkdir for {what}")
        argv = ["rsync", "-a", "--delete", "-e", ssh.rsync_shell(), *sources, f"{host}:{remote}/"]
        if ssh.verbose >= 2:
            print(f"[{host}] {shlex.join(argv)}", file=sys.stderr)
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RemoteFailed(host, f"copying {what} failed: {done.stderr.strip()[-300:]}")

    raise_first(in_parallel(list(hosts), push))


def local_image_info(image: str) -> ImageInfo | None:
    try:
        done = subprocess.run(["docker", "image", "inspect", "--format", IMAGE_FORMAT, image],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_image_info(done.stdout.strip()) if done.returncode == 0 else None


def image_nowhere_message(image: str, hosts, head: str) -> str:
    return (f"image {image} is on none of {', '.join(hosts)} (for their platform) and could not be pulled on "
            f"{head} or here; load it on this machine or on one host (docker load -i FILE), or pass --image")


def moving_tag(image: str) -> bool:
    """A tag its publisher rebuilds: none (latest), `:latest`, or one naming a nightly build; not
    a digest, nor eugr's tags, which a local build makes and no registry holds."""
    if "@" in image or EUGR_IMAGE.fullmatch(image):
        return False
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return tag in ("", "latest") or "nightly" in tag


MOVING_TAG_NOTE = "image {image} is a moving tag (its publisher rebuilds it); in use: {copy}; --pull fetches the newest"
PULL_NOTE = "image {image}: --pull: docker pull on {head} first; hosts holding another copy get the head's"
PINNED_NOTE = "image {image} has a pinned tag: --pull leaves it as it is"
PULL_FAILED = "{head}: could not pull {image} ({why}); going on with the copies present"
PULL_TIMEOUT_S = 1800  # a rebuilt image is tens of GB; offline, docker fails within seconds


def image_note(image: str, pull: bool, facts: dict, hosts) -> str:
    """The plan's note on the image: pulled first (--pull on a moving tag), else, for a moving
    tag, which copy runs and its age."""
    if not moving_tag(image):
        return PINNED_NOTE.format(image=image) if pull else ""
    if pull:
        return PULL_NOTE.format(image=image, head=hosts[0])
    holder = next((h for h in hosts if facts.get(h) and facts[h].image_info(image)), None)
    if holder:
        copy = f"the copy on {holder} ({facts[holder].image_info(image).describe()})"
    else:
        copy = "the copy this launch finds or pulls" if facts else "the copy on the hosts (not asked without --detect)"
    return MOVING_TAG_NOTE.format(image=image, copy=copy)


def pull_script(image: str) -> str:
    """`docker pull` on a host, then the pulled image's IMAGE_FORMAT line."""
    return (f"docker pull --quiet {shlex.quote(image)} >/dev/null && docker image inspect --format "
            f"{shlex.quote(IMAGE_FORMAT)} {shlex.quote(image)}\n")


def pull_on_head(ssh: SSH, image: str, head: str) -> ImageInfo | None:
    """--pull: one `docker pull` on the head, bounded by PULL_TIMEOUT_S. Its copy, or None after
    one warning (offline, registry down, no login): the launch goes on with the copies present."""
    start = time.monotonic()
    try:
        result = ssh.run(head, f"timeout {PULL_TIMEOUT_S} {pull_script(image)}", timeout=PULL_TIMEOUT_S + 60)
    except HostError as error:
        warn(PULL_FAILED.format(head=head, image=image, why=str(error).removeprefix(f"{head}: ")))
        return None
    info = parse_image_info(result.stdout.strip()) if result.ok else None
    if info is None:
        why = (f"no answer within {PULL_TIMEOUT_S} s" if result.returncode == 124
               else result.stderr_tail(1) or f"exit {result.returncode}")
        warn(PULL_FAILED.format(head=head, image=image, why=why))
        return None
    say(f"Image {image}: pulled on {head} in {time.monotonic() - start:.1f} s: {info.describe()}")
    return info


def platform_of(facts: HostFacts | None) -> str:
    return f"linux/{facts.docker_arch if facts and facts.docker_arch else SPARK_ARCH}"


def distribute_image(ssh: SSH, image: str, facts: dict, hosts, *, build=None, dist: Distribution | None = None,
                     pull: bool = False) -> None:
    """Make every host hold `image` for its own platform, from the best source: with `pull`, the
    copy the head has just pulled; else this machine's (only a copy of the hosts' architecture: an
    amd64 image loaded onto a Spark would replace its arm64 image of that tag), else a host's,
    else a pull on the head for its own platform, else a pull here with --platform, else `build`
    (eugr's images). This machine sends at most one `docker save` stream, to one host; hosts copy
    to each other over the fabric."""
    hosts = list(hosts)
    head = hosts[0]
    arch = {h: facts[h].docker_arch or SPARK_ARCH for h in hosts}
    infos = {h: facts[h].image_info(image) for h in hosts}
    fits = {h: infos[h] for h in hosts if infos[h] and infos[h].arch in ("", arch[h])}
    pulled = pull_on_head(ssh, image, head) if pull else None
    if pulled:
        fits[head], local = pulled, None  # this machine's copy may be older: the head's is the newest
    else:
        local = local_image_info(image)
        local = local if local and all(local.arch in ("", arch[h]) for h in hosts) else None
    reference = pulled or local or next(iter(fits.values()), None)
    if reference is None:
        reference, local = obtain_image(ssh, image, facts, hosts, build)
        if reference is not local:
            fits[head] = reference
    holders = [h for h in hosts if h in fits and same_image(fits[h], reference)]
    lacking = [h for h in hosts if h not in holders]
    if not lacking:
        return
    dist = dist or Distribution(ssh, facts, hosts)
    origin = ", ".join(holders) if holders else "this machine"
    say(f"Image {image}: copying from {origin} to {', '.join(lacking)}")
    pending = record_pending(f"image {image}", lacking)
    try:
        dist.run_rounds(plan_copies(lacking, holders, facts), lambda c: dist.copy_image(image, c),
                        lambda targets: dist.image_fallback(image, holders, targets, bool(local)))
    finally:
        pending.unlink(missing_ok=True)


def obtain_image(ssh: SSH, image: str, facts: dict, hosts, build) -> tuple[ImageInfo, ImageInfo | None]:
    """An image no one has for the hosts' platform: pulled on the head (for its own platform),
    else here with --platform, else built. Returns (its info, the local info when it is here)."""
    head = hosts[0]
    pulled = ssh.run(head, pull_script(image), timeout=3600)
    if pulled.ok and parse_image_info(pulled.stdout.strip()):
        say(f"Image {image}: pulled on {head}")
        return parse_image_info(pulled.stdout.strip()), None
    platform = platform_of(facts.get(head))
    if shutil.which("docker"):
        here = subprocess.run(["docker", "pull", "--platform", platform, image], capture_output=True, text=True,
                              timeout=3600)
        local = local_image_info(image) if here.returncode == 0 else None
        if local:
            say(f"Image {image}: pulled here for {platform}")
            return local, local
    if build:
        return build(), None
    raise SparkrunError(image_nowhere_message(image, hosts, head))


# eugr's recipes name `vllm-node` (or `vllm-node-*`): a tag its build-and-copy.sh builds on the
# machine it runs on, never pushed to a registry.
EUGR_IMAGE = re.compile(r"vllm-node(?:-[\w.-]+)?(?::[\w.-]+)?")
EUGR_BUILD_SCRIPT = "build-and-copy.sh"
REMOTE_EUGR_BUILD = ".cache/sparkrun/eugr-build"


def images_config_file() -> Path:
    return config_dir() / "images.yaml"


def image_alias(image: str) -> str | None:
    """A prebuilt image that stands for a locally built tag: `aliases:` in the configuration's
    images.yaml, else `image_aliases:` in an enabled registry's manifest."""
    tables = []
    if images_config_file().is_file():
        _, data = read_yaml_file(images_config_file())
        tables.append((data or {}).get("aliases") if isinstance(data, dict) else None)
    for clone in dict.fromkeys(registries_root() / e["clone"] for e in enabled_registries()):
        if (clone / MANIFEST).is_file():
            _, data = read_yaml_file(clone / MANIFEST)
            tables.append(data.get("image_aliases") if isinstance(data, dict) else None)
    name = image.partition(":")[0] if image.endswith(":latest") else image
    return next((str(t[key]) for t in tables if isinstance(t, dict) for key in (image, name) if t.get(key)), None)


def eugr_clone() -> Path | None:
    """A registry clone that carries eugr's build script (a clone of eugr/spark-vllm-docker)."""
    return next((clone for clone in dict.fromkeys(registries_root() / e["clone"] for e in enabled_registries())
                 if (clone / EUGR_BUILD_SCRIPT).is_file()), None)


def eugr_image_message(image: str) -> str:
    return (f"image {image} is built by eugr's {EUGR_BUILD_SCRIPT} and exists on no host and not here; add eugr's "
            f"registry (sparkrun registry add https://github.com/eugr/spark-vllm-docker.git) so it can be built "
            f"on the head, or name a prebuilt image for it under 'aliases:' in {images_config_file()} "
            f"(or pass --image)")


def eugr_builder(ssh: SSH, recipe: Recipe, image: str, hosts):
    """For eugr's image tags: a function that makes the image on the head when it exists nowhere
    (a prebuilt image alias pulled and tagged, else eugr's build script with the recipe's
    build_args) and returns its ImageInfo; None for other images."""
    if not EUGR_IMAGE.fullmatch(image):
        return None
    head = hosts[0]

    def build() -> ImageInfo:
        alias = image_alias(image)
        clone = eugr_clone()
        if alias:
            say(f"Image {image}: pulling its alias {alias} on {head}")
            script = f"docker pull {shlex.quote(alias)} >/dev/null && docker tag {shlex.quote(alias)} {shlex.quote(image)}\n"
        elif clone:
            say(f"Image {image}: building it on {head} with eugr's {EUGR_BUILD_SCRIPT} (this takes a while)")
            mirror_folders(ssh, [head], [f"{clone}/"], REMOTE_EUGR_BUILD, "eugr's build files")
            build_args = [str(a) for a in recipe.build_args]
            script = (f"cd {quote_path(REMOTE_EUGR_BUILD)} && "
                      f"{shlex.join(['bash', EUGR_BUILD_SCRIPT, '-t', image, *build_args])}\n")
        else:
            raise SparkrunError(eugr_image_message(image))
        ssh.run(head, script, timeout=6 * 3600, check=True,
                what=f"{'pulling ' + alias if alias else 'building ' + image}")
        info = ssh.run(head, f"docker image inspect --format {shlex.quote(IMAGE_FORMAT)} {shlex.quote(image)}\n",
                       check=True, what=f"docker image inspect {image}")
        return parse_image_info(info.stdout.strip())

    return build


def stream_to_hosts(ssh: SSH, source_argv: list[str], hosts, sink_remote: list[str], *,
                    what: str = "image") -> dict:
    """One producer, many `ssh host <sink>` consumers fed the same bytes; a line of progress.
    Returns host -> bytes sent."""
    source = subprocess.Popen(source_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sinks = {h: subprocess.Popen(ssh.argv(h, sink_remote, stream=True) if h not in LOCAL_HOSTS else sink_remote,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for h in hosts}
    sent, start, last = 0, time.monotonic(), 0.0
    broken: dict[str, str] = {}
    try:
        while chunk := source.stdout.read(1 << 20):
            for host, sink in sinks.items():
                if host in broken:
                    continue
                try:
                    sink.stdin.write(chunk)
                except BrokenPipeError:
                    broken[host] = "connection closed"
            sent += len(chunk)
            if time.monotonic() - last > 1 and sys.stderr.isatty():
                last = time.monotonic()
                rate = sent / 2**20 / max(last - start, 1e-3)
                print(f"\r  {sent / 2**20:,.0f} MiB sent to {len(sinks) - len(broken)} host(s), {rate:.0f} MiB/s",
                      end="", file=sys.stderr, flush=True)
    finally:
        for sink in sinks.values():
            try:
                sink.stdin.close()
            except BrokenPipeError:
                pass
    source_err = source.stderr.read().decode(errors="replace")
    if source.wait() != 0:
        for sink in sinks.values():
            sink.kill()
        raise SparkrunError(f"reading the {what} failed: {source_err.strip()[-300:]}")
    elapsed = time.monotonic() - start
    for host, sink in sinks.items():
        err = sink.stderr.read()
        sink.wait()
        if sink.returncode != 0 or host in broken:
            raise RemoteFailed(host, f"receiving the {what} failed: "
                                     f"{err.decode(errors='replace').strip()[-300:] or broken.get(host)}")
        say(f"[{host}] {what} received: {sent / 2**20:.1f} MiB in {elapsed:.1f} s")
    return {h: sent for h in hosts}


# Tuned fused-MoE configs: `sparkrun tune` (commands/benchmark.py) writes them under
# cache_dir()/tuning/<engine>; launches copy that folder to their hosts and mount it.

class TuningEngine(Record):
    name: str
    package: str  # the Python package in the image, to find its source tree
    script: str  # the tuning script, relative to the engine's repository
    repo: str  # where the scripts come from without --skip-clone
    repo_env: str  # environment variable that replaces `repo` (a mirror)
    env_var: str  # what points the engine at tuned configs
    image_dirs: tuple  # where images usually keep the engine's source


TUNING_ENGINES = {
    "sglang": TuningEngine("sglang", "sglang", "benchmark/kernels/fused_moe_triton/tuning_fused_moe_triton.py",
                           "https://github.com/sgl-project/sglang.git", "SPARKRUN_SGLANG_REPO",
                           "SGLANG_MOE_CONFIG_DIR", ("/sgl-workspace/sglang", "/workspace/sglang", "/opt/sglang")),
    "vllm": TuningEngine("vllm", "vllm", "benchmarks/kernels/benchmark_moe.py",
                         "https://github.com/vllm-project/vllm.git", "SPARKRUN_VLLM_REPO",
                         "VLLM_TUNED_CONFIG_FOLDER", ("/vllm-workspace", "/workspace/vllm", "/opt/vllm")),
}


TUNING_MANIFEST = "sparkrun-tuning.json"  # which model and TP size produced which config


REMOTE_TUNING = "~/.cache/sparkrun/tuning"  # on the hosts: what launches mount


CONTAINER_TUNING = "/root/.cache/sparkrun/tuning"


def tuning_engine_of(runtime: str) -> str | None:
    if runtime == "sglang":
        return "sglang"
    if runtime.startswith("vllm") or runtime == "eugr-vllm":
        return "vllm"
    return None


def tuning_dir(engine: str) -> Path:
    return cache_dir() / "tuning" / engine


def read_tuning_manifest(folder: Path) -> dict:
    """The manifest's models and registry files; entries of another shape are left out."""
    data = _read_json(folder / TUNING_MANIFEST) or {}
    models, files = data.get("models"), data.get("registry_files")
    models = {model: {tp: entry for tp, entry in sizes.items()
                      if tp.isdigit() and isinstance(entry, dict) and isinstance(entry.get("files"), list)
                      and all(isinstance(f, str) for f in entry["files"])}
              for model, sizes in models.items() if isinstance(sizes, dict)} if isinstance(models, dict) else {}
    files = [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
    return {"models": models, "registry_files": files}


def change_tuning_manifest(folder: Path, change) -> None:
    """Apply change(manifest) under the manifest's lock and replace it whole."""
    with ConfigLock(folder / TUNING_MANIFEST):
        manifest = read_tuning_manifest(folder)
        change(manifest)
        atomic_write(folder / TUNING_MANIFEST, json.dumps(manifest, indent=2) + "\n")


def tuned_sizes(folder: Path, model: str) -> set[int]:
    """TP sizes tuned for `model` whose config files are all still in `folder`."""
    entries = read_tuning_manifest(folder)["models"].get(model, {})
    return {int(tp) for tp, entry in entries.items()
            if entry["files"] and all((folder / f).is_file() for f in entry["files"])}


def sync_registry_tuning(engine: str, folder: Path) -> list[str]:
    """Copy the enabled registries' `<tuning>/<engine>/` configs into `folder` where it has no file
    of that name (configs tuned here win). Returns the registry files now present."""
    manifest = read_tuning_manifest(folder)
    present = set(manifest["registry_files"])
    added = []
    for entry in enabled_registries():
        for path in clone_files(entry, "tuning", "*.json", sub=engine):
            relative = path.relative_to(registry_folder(entry, "tuning") / engine).as_posix()
            if relative not in present and not (folder / relative).exists():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, folder / relative)
                added.append(relative)
                present.add(relative)
    if added:
        change_tuning_manifest(folder, lambda manifest: manifest.update(
            registry_files=sorted(set(manifest["registry_files"]) | present)))
    return sorted(f for f in present if (folder / f).is_file())


class TuningMount(Record):
    """Tuned configs a launch mounts: synced from `local` to `remote` on every host."""
    engine: str
    local: Path
    remote: str  # on the hosts ("~/" is the remote home)
    container: str  # mount point in the container
    env: tuple  # (name, value) that points the engine at them
    note: str


def tuning_mount(recipe: Recipe) -> TuningMount | None:
    """The engine's tuned configs when there are some for this recipe's model (or from a registry)."""
    engine = tuning_engine_of(recipe.runtime)
    if engine is None:
        return None
    folder = tuning_dir(engine)
    # Registries are only read once configured: a launch from a file must not fetch the defaults.
    if registries_file().exists() and registry_tuning_dirs():
        registry_files = sync_registry_tuning(engine, folder)
    else:
        registry_files = [f for f in read_tuning_manifest(folder)["registry_files"] if (folder / f).is_file()]
    tuned = sorted(tuned_sizes(folder, recipe.model_repo))
    if not tuned and not registry_files:
        return None
    base = f"{CONTAINER_TUNING}/{engine}"
    # SGLang looks in $SGLANG_MOE_CONFIG_DIR/configs/triton_<version>/; vLLM in the folder itself.
    container = f"{base}/configs" if engine == "sglang" else base
    what = [f"TP {', '.join(map(str, tuned))} tuned here"] if tuned else []
    what += [f"{len(registry_files)} from registries"] if registry_files else []
    return TuningMount(engine, folder, f"{REMOTE_TUNING}/{engine}", container,
                       (TUNING_ENGINES[engine].env_var, base),
                       f"tuned {engine} MoE configs mounted ({'; '.join(what)})")


def sync_tuning(ssh: SSH, mount: TuningMount, hosts) -> None:
    """Make every host's copy of the tuned configs equal to this machine's."""
    mirror_folders(ssh, hosts, [f"{mount.local}/"], mount.remote.removeprefix(HOME_PREFIX), "tuned configs")


COMPLETE_COMMAND = "__complete"  # hidden: `sparkrun __complete SHELL WORD...` prints candidates


# The page-cache step of a launch and `sparkrun setup clear-cache` write here.
DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_caches_target() -> str:
    """The kernel file; SPARKRUN_DROP_CACHES replaces it on the test bed's simulated hosts."""
    return '"${SPARKRUN_DROP_CACHES:-' + DROP_CACHES + '}"'


# ---------------------------------------------------------------------------
# 10. CLI
# ---------------------------------------------------------------------------

def print_table(rows: list[list[str]], headers: list[str]) -> None:
    header, *lines = table_lines(rows, headers)
    print("\n".join([bold(header), *lines]))


def table_lines(rows: list[list[str]], headers: list[str]) -> list[str]:
    rows = [[one_cell(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]


def one_cell(text: str) -> str:
    """A table cell, on one line."""
    return str(text).replace("\n", " ").replace("\t", " ")


def cmd_list(args) -> int:
    summaries = summarize(catalog(include_hidden=args.all))
    if args.runtime:
        summaries = [s for s in summaries if s.runtime.startswith(args.runtime)]
    summaries = search_summaries(summaries, getattr(args, "query", None))
    if args.json:
        print(json.dumps([s.as_dict() for s in summaries], indent=2))
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
        "env": {k: "***" if SECRET_NAME.search(k) else v for k, v in recipe.env.items()},
        "command": recipe.command, "mods": recipe.mods,
        "build_args": recipe.build_args, "runtime_config": recipe.runtime_config,
    }


def show_text(recipe: Recipe) -> str:
    lines = [
        f"Name:         {recipe.display_name}",
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
    recipe = find_recipe(args.recipe, include_hidden=args.all, runtime=args.runtime)
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


def say(message: str) -> None:
    print(mask(message), file=sys.stderr, flush=True)


def launch_options(args) -> LaunchOptions:
    overrides = parse_overrides(args.override)
    overrides.update(typed_overrides(args))
    if args.image:
        check_cli_value("--image", args.image)
    if args.cache_dir:
        check_cli_value("--cache-dir", args.cache_dir)
    if args.memory_floor is not None and args.memory_floor < 0:
        raise UsageError(f"--memory-floor takes GB of available memory, 0 or more (0: off), not {args.memory_floor:g}")
    for flag in ("init_port", "ray_port", "dashboard_port"):
        value = getattr(args, flag)
        if value is not None and typed_value_problem("port", value):
            raise UsageError(f"--{flag.replace('_', '-')} must be a port number from 1 to 65535, not {value}")
    return LaunchOptions(overrides=overrides, image=args.image, cache_dir=args.cache_dir,
                         init_port=args.init_port, ray_port=args.ray_port, dashboard=args.dashboard,
                         dashboard_port=args.dashboard_port, solo=args.solo, no_sync=args.no_sync,
                         pull=args.pull)


def choose_free_port(facts: dict, hosts, start: int = 8000) -> int:
    for port in range(start, start + 1000):
        if not any(isinstance(facts[h], HostFacts) and facts[h].port_busy(port) for h in hosts):
            return port
    raise SparkrunError(f"no free port in {start}-{start + 999} on every host")


def cmd_run(args) -> int:
    """Launch, then follow the head's log. A signal once every container has started detaches
    (the job keeps running); with --foreground it stops the job on every host instead, as
    does the end of the log."""
    if args.foreground and args.no_follow:
        raise UsageError("--foreground follows the logs until the job ends; drop --no-follow")
    recipe = find_recipe(args.recipe)
    selection = select_hosts(args)
    ssh, plan = SSH(selection.user, args.verbose), None
    try:
        plan, ssh = launch(args, recipe, selection)
        if plan is None or args.no_follow:
            return 0
        code = follow_logs(ssh, plan.head, plan.head_container.name)
        if args.foreground:
            stop_plan(ssh, plan, "its log ended")
        return code
    except KeyboardInterrupt as interrupt:
        plan = plan or getattr(interrupt, "plan", None)
        if plan is None:
            raise
        if args.foreground:
            stop_plan(ssh, plan, "interrupted")
        else:
            say(detach_message(plan.recipe, selection))
        return signal_exit_code(interrupt)


def stop_plan(ssh: SSH, plan: LaunchPlan, why: str) -> None:
    """--foreground: the job ends with the command."""
    say(f"Stopping {plan.recipe} on {', '.join(plan.hosts)} ({why}; --foreground) ...")
    names: dict[str, list[str]] = {}
    for spec in plan.containers:
        names.setdefault(spec.host, []).append(spec.name)
    remove_containers(ssh, names)


def launch(args, recipe: Recipe, selection: HostSelection) -> tuple[LaunchPlan | None, SSH]:
    """Everything `run` does up to a ready endpoint (or the printed plan with --dry-run: None).
    `args` carries run's options (benchmark reuses them)."""
    started = time.monotonic()
    errors, _ = validate_recipe(recipe)
    if errors:
        raise RecipeError(str(recipe.path), errors[0])
    auto_port = args.port == "auto"
    args.port = None if auto_port else args.port
    options = launch_options(args)
    estimate = recipe_vram(recipe, options.overrides, hf_home=hf_home(args.cache_dir))
    if estimate.verdict == NO:
        message = (f"recipe {recipe.name} may not fit: {estimate.per_gpu_bytes / GIB:.1f} GB per GPU "
                   f"> {estimate.usable_bytes / GIB:.1f} GB usable (see 'sparkrun recipe vram {recipe.name}')")
        if args.strict:
            raise UsageError(message + "; refusing because of --strict")
        warn(message)
    ssh = SSH(selection.user, args.verbose)
    local_home = hf_home(args.cache_dir)
    tuning = None if getattr(args, "no_sync_tuning", False) else tuning_mount(recipe)
    needs = repo_needs(recipe, one_line(render_command(recipe, recipe_values(recipe, options.overrides))))
    snapshots = local_snapshots(needs, local_home)
    if args.dry_run and not args.detect:
        print(plan_launch(recipe, selection, options, snapshots=snapshots, tuning=tuning,
                          arch=estimate.arch).describe())
        return None, ssh
    image = options.image or recipe.container
    facts = probe_hosts(ssh, selection.hosts, images=(image,))
    if auto_port:
        port = choose_free_port(facts, selection.hosts)
        options = options.replace(overrides=dict(options.overrides, port=port))
    reachable = {h: f for h, f in facts.items() if isinstance(f, HostFacts)}
    plan = plan_launch(recipe, selection, options, reachable, snapshots=snapshots, tuning=tuning, arch=estimate.arch)
    inspected = image_entrypoint(image, reachable, plan.hosts) is not None
    if args.dry_run:
        print(plan.describe())
        return None, ssh
    existing = preflight(plan, facts, args.replace)
    short = memory_shortfalls(plan, facts, estimate, recipe_values(recipe, options.overrides).get(
        "gpu_memory_utilization"), skip={h for h, _ in existing})
    short += mtu_mismatches(plan, facts)
    if short and args.strict:
        raise SparkrunError("\n       ".join(short) + "\n       refusing to launch because of --strict")
    for line in short:
        warn(line)
    if existing:
        say(f"Replacing the running {plan.cluster_id} ...")
        remove_containers(ssh, {h: [n for hh, n in existing if hh == h] for h in plan.hosts})
    distribution_started = time.monotonic()
    dist = Distribution(ssh, reachable, plan.hosts, remote_cache_root(args.cache_dir))
    distribute_image(ssh, image, facts, plan.hosts, build=eugr_builder(ssh, recipe, image, plan.hosts), dist=dist,
                     pull=options.pull and moving_tag(image))
    if not args.no_sync:
        snapshots = distribute_models(dist, needs, home=local_home, cache_dir_option=args.cache_dir,
                                      download_on=args.download_on)
        plan = plan_launch(recipe, selection, options, reachable, snapshots=snapshots, tuning=tuning,
                           arch=estimate.arch)
    for note in plan.notes:
        say(note)
    if plan.mods:
        sync_mods(ssh, plan)
    if tuning:
        sync_tuning(ssh, tuning, plan.hosts)
    distribution = time.monotonic() - distribution_started
    if not inspected:  # the image arrived with the distribution: read its ENTRYPOINT now
        reachable.update(raise_first(probe_hosts(ssh, [plan.head], images=(image,))))
    if entrypoint_needs_check(recipe, image, reachable, plan.hosts):
        passes = check_entrypoint(ssh, plan.head, image)
        reachable[plan.head] = reachable[plan.head].replace(entrypoint_checks=((image, passes),))
    if not inspected or reachable[plan.head].entrypoint_checks:
        plan = plan_launch(recipe, selection, options, reachable, snapshots=snapshots, tuning=tuning,
                           arch=estimate.arch)
    page_cache = 0.0
    if not args.no_drop_cache:
        since = time.monotonic()
        free_page_cache(ssh, plan.hosts, snapshots, remote_cache_root(args.cache_dir))
        page_cache = time.monotonic() - since
    say(f"Launching {recipe.name} ({plan.runtime}) on {', '.join(plan.hosts)}")
    try:
        waited, readiness = execute_launch(plan, ssh, ready_timeout=args.ready_timeout, say=say,
                                           memory_floor=args.memory_floor)
        plan = plan.replace(served_model=readiness.served)
        for command in plan.post_exec:
            ssh.run(plan.head, shlex.join(["docker", "exec", plan.head_container.name, "bash", "-c", command]) + "\n",
                    check=True, what=f"post_exec '{command}'")
    except KeyboardInterrupt as interrupt:  # every container had started: the job keeps running
        detached = interrupt if isinstance(interrupt, Detached) else Detached(interrupt)
        detached.plan = plan
        raise detached from None
    print(ready_banner(plan, readiness.through_head))
    if args.verbose:
        total = time.monotonic() - started
        say(f"timings: {total:.2f} s in all: {waited:.2f} s waiting for the server, "
            f"{total - waited:.2f} s sparkrun's own (of which {distribution:.2f} s image and model distribution, "
            f"{page_cache:.2f} s freeing the page cache)")
    return plan, ssh


def host_args(selection: HostSelection) -> str:
    return "" if selection.source.startswith("cluster") else f" -H {','.join(selection.hosts)}"


def ready_banner(plan: LaunchPlan, through_head: bool = False) -> str:
    """The endpoint and a curl line to try it (the API key masked); for an endpoint that only
    the head reaches, the ssh tunnel that brings it here."""
    endpoint = plan.endpoint
    lines = [f"\nReady: {endpoint}  (model: {plan.served_model})"]
    if through_head:
        endpoint = f"http://localhost:{plan.port}/v1"
        lines.append(SSH_TUNNEL_HINT.format(endpoint=plan.endpoint, port=plan.port, address=plan.head_address,
                                            head=plan.head, local=endpoint))
    auth = " -H 'Authorization: Bearer ***'" if plan.api_key else ""
    lines += [f"  curl {endpoint}/chat/completions -H 'Content-Type: application/json'{auth} \\",
              f"    -d '{{\"model\": \"{plan.served_model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"]
    return "\n".join(lines) + "\n"


SSH_TUNNEL_HINT = ("  {endpoint} does not answer from this machine; reach it through ssh:\n"
                   "    ssh -N -L {port}:{address}:{port} {head}   # then use {local}")


def detach_message(recipe: str, selection: HostSelection) -> str:
    hosts = host_args(selection)
    return (f"\nDetached; the server keeps running.\n"
            f"  Follow:    sparkrun logs {recipe}{hosts}\n  Stop:      sparkrun stop {recipe}{hosts}")


def launch_names(name: str) -> tuple[str, ...]:
    """The names a launch of this recipe is labelled with (file stem, `name:` field). A name that
    is no file and not in the catalog is taken as written: a recipe launched from a file, named."""
    try:
        recipe = find_recipe(name)
    except UsageError:
        if name.endswith((".yaml", ".yml")):
            raise
        return (name,)
    return tuple(dict.fromkeys((recipe.name, recipe.display_name)))


def cmd_stop(args) -> int:
    if not args.recipe and not args.all:
        raise UsageError("name a recipe to stop, or pass --all to stop every sparkrun container")
    recipe = launch_names(args.recipe) if args.recipe else None
    selection = select_hosts(args)
    hosts = selection.hosts[:args.tp] if args.tp else selection.hosts
    port = None if args.port == "auto" else args.port
    ssh = SSH(selection.user, args.verbose)
    found = find_workloads(ssh, hosts, recipe=recipe, port=port)
    names = {h: [c["Names"] for c in cs] for h, cs in found.items() if cs}
    what = recipe[0] if recipe else "sparkrun"
    if not names:
        print(f"Nothing to stop: no {what} containers on {', '.join(hosts)}.")
        return 0
    for host, containers in names.items():
        print(f"[{host}] {'would remove' if args.dry_run else 'removing'} {', '.join(containers)}")
    if not args.dry_run:
        remove_containers(ssh, names, grace=0 if args.force else STOP_GRACE_S)
        left = {h: cs for h, cs in find_workloads(ssh, names, recipe=recipe, port=port).items() if cs}
        if left:
            raise SparkrunError(f"{next(iter(left))}: containers still present after docker rm -f")
        print(f"Stopped {sum(len(v) for v in names.values())} container(s).")
    return 0


def cmd_logs(args) -> int:
    names = launch_names(args.recipe)
    selection = select_hosts(args)
    hosts = selection.hosts[:args.tp] if args.tp else selection.hosts
    ssh = SSH(selection.user, args.verbose)
    found = find_workloads(ssh, hosts, recipe=names, role="head")
    heads = [(h, c) for h, cs in found.items() for c in cs]
    if not heads:
        raise SparkrunError(f"no running {names[0]} on {', '.join(hosts)}; see 'sparkrun status'")
    host, container = heads[0]
    try:
        return follow_logs(ssh, host, container["Names"], str(args.tail), follow=not args.no_follow)
    except KeyboardInterrupt:
        say(f"\nStopped following; {names[0]} keeps running.")
        return 0


def cmd_status(args) -> int:
    if args.check and (args.watch is not None or args.no_probe):
        raise UsageError("--check needs one probed status: drop --watch and --no-probe")
    if args.watch is not None and args.watch < MIN_WATCH_S:
        raise UsageError(f"--watch takes at least {MIN_WATCH_S} seconds between refreshes")
    selection = select_hosts(args)
    monitor = StatusMonitor(SSH(selection.user, args.verbose), selection.hosts, not args.no_probe,
                            args.stall_after)
    if args.watch is not None:
        return watch_status(monitor, args.watch, args.count, args.json)
    facts, workloads = monitor.refresh()
    pending = pending_operations()
    down = [h for h, f in facts.items() if isinstance(f, HostError)]
    if args.json:
        print(json.dumps(status_dict(facts, workloads, pending), indent=2))
    else:
        print("\n".join(status_lines(facts, workloads, pending)))
    unhealthy = [w for w in workloads if w.get("health") not in HEALTHY]
    if args.check and unhealthy:
        for w in unhealthy:
            print(unhealthy_message(w), file=sys.stderr)
        return UNHEALTHY_EXIT
    return PARTIAL_EXIT if down else 0


PARTIAL_EXIT = 3
UNHEALTHY_EXIT = 4
HEALTHY = ("ready", "busy")
STALL_AFTER_S = 60.0
MIN_WATCH_S = 0.2


def unhealthy_message(workload: dict) -> str:
    return f"Unhealthy: {workload['recipe']} at {workload['endpoint']} is {workload['health']}: {workload['reason']}"


class StatusMonitor:
    """One refresh = one probe round trip per host (host figures, containers, the heads' /metrics),
    then each workload's health from it and from the previous samples (rates, stall clocks),
    which are kept in the cache folder so that separate `status` runs see them too."""

    def __init__(self, ssh: SSH, hosts: list, probe: bool, stall_after: float):
        self.ssh, self.hosts, self.probe, self.stall_after = ssh, hosts, probe, stall_after
        self.metric_names = runtime_metric_names() if probe else ()
        self.samples_path = cache_dir() / "status-samples.json"

    def refresh(self) -> tuple[dict, list]:
        facts = probe_hosts(self.ssh, self.hosts, metric_names=self.metric_names, caches=True)
        workloads = collect_workloads(facts)
        if self.probe:
            samples = read_json_file(self.samples_path)
            for workload in workloads:
                assess_workload(workload, facts, samples, self.stall_after)
            write_json_file(self.samples_path, {k: v for k, v in samples.items()
                                                if v.get("at", 0) > time.time() - SAMPLES_KEPT_S})
        return facts, workloads


SAMPLES_KEPT_S = 86400


def read_json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_file(path: Path, data: dict) -> None:
    """Atomically: a concurrent reader sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


def runtime_metric_names() -> tuple:
    """Every metric name the built-in runtimes read: what the status probe keeps of /metrics."""
    names: list[str] = []
    for runtime in RUNTIMES:
        for options in getattr(load_runtime(runtime), "METRICS", {}).values():
            names += [n for n in options if n not in names]
    return tuple(names)


def runtime_metrics(runtime: str) -> dict:
    try:
        return getattr(load_runtime(runtime), "METRICS", {})
    except UsageError:  # a runtime not installed here
        return {}


PROMETHEUS_SAMPLE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def engine_figures(lines: list[str], metrics: dict) -> dict:
    """Prometheus text lines to {figure: value} by a runtime's METRICS: of a figure's names, the
    first one present counts; its samples (one per engine or label set) add up, except the KV
    cache usage, where the fullest counts."""
    samples: dict[str, list[float]] = {}
    for line in lines:
        match = PROMETHEUS_SAMPLE.match(line)
        if match and number_or_none(match.group(3)) is not None:
            samples.setdefault(match.group(1), []).append(float(match.group(3)))
    figures = {}
    for figure, names in metrics.items():
        name = next((n for n in names if n in samples), None)
        if name:
            figures[figure] = (max if figure == "kv_cache" else sum)(samples[name])
    return figures


def rfc3339_epoch(text: str) -> float | None:
    """docker's StartedAt ("2026-11-28T09:51:53.123456789Z"); None for Go's zero time."""
    from datetime import datetime, timezone

    try:
        moment = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return moment.timestamp() if moment.year > 1 else None


def assess_workload(workload: dict, facts: dict, samples: dict, stall_after: float) -> None:
    """Add health, reason, uptime and the engine's figures to a workload (from collect_workloads).

    failed: a container is not running, or restarted (with its last log lines); starting: the
    head's server does not answer yet (or answers 503 while loading); stalled: requests run or
    wait but generated tokens have not moved for stall_after seconds; busy: requests run or wait;
    ready: idle."""
    probes = [(c, facts[c["host"]].engines.get(c["name"])) for c in workload["containers"]]
    head_container, head = next(((c, p) for c, p in probes if c["role"] == "head"), (None, None))
    clock = facts[head_container["host"]].clock if head_container else 0.0
    started = rfc3339_epoch(head.started) if head else None
    workload.update(health="", reason="", uptime_s=round(clock - started, 1) if started and clock else None,
                    requests_running=None, requests_waiting=None, prompt_tokens_per_s=None,
                    generation_tokens_per_s=None, interval_s=None, kv_cache_usage=None, last_log_lines=[])
    broken = next(((c, p) for c, p in probes if p is None or p.state != "running" or p.restarts), None)
    if broken:
        container, probe = broken
        workload.update(health="failed", reason=container_failure(container, probe),
                        last_log_lines=probe.logs if probe else [])
    elif head is None:
        head_host = workload["endpoint"].partition("//")[2].rpartition(":")[0]
        workload.update(health="unknown", reason=f"its head ({head_host}) is not among the hosts asked")
    elif head.http_status is None or head.http_status == 503:
        port = workload["endpoint"].rpartition(":")[2].partition("/")[0]
        workload.update(health="starting", reason=f"not answering on port {port} yet" if head.http_status is None
                        else "loading (HTTP 503)")
    else:
        figures = engine_figures(head.metrics, runtime_metrics(workload["runtime"]))
        assess_engine(workload, figures, samples, f"{workload['cluster_id']}@{head.started}", clock, stall_after)
        if head.http_status != 200:
            workload["reason"] = f"no engine figures (/metrics answered HTTP {head.http_status})"
    workload["ready"] = workload["health"] in HEALTHY


def container_failure(container: dict, probe) -> str:
    where = f"container {container['name']} on {container['host']}"
    if probe is None:
        return f"{where} is gone"
    if probe.state == "running":
        return f"{where} restarted {probe.restarts} time{'s' * (probe.restarts != 1)}"
    return f"{where} is {probe.state} (exit code {probe.exit_code})"


def assess_engine(workload: dict, figures: dict, samples: dict, key: str, clock: float, stall_after: float) -> None:
    """busy, stalled or ready from the engine's figures; rates since the previous sample of the
    same server (key: its launch and start time)."""
    running, waiting = int(figures.get("running", 0)), int(figures.get("waiting", 0))
    prompt, generated = figures.get("prompt_tokens"), figures.get("generation_tokens")
    previous = samples.get(key) or {}
    interval = clock - previous.get("at", clock)
    if interval > 0 and generated is not None and generated >= previous.get("generation", math.inf):
        workload.update(interval_s=round(interval, 2),
                        generation_tokens_per_s=round((generated - previous["generation"]) / interval, 1))
        if prompt is not None and prompt >= previous.get("prompt", math.inf):
            workload["prompt_tokens_per_s"] = round((prompt - previous["prompt"]) / interval, 1)
    # The stall clock runs while requests are there and the generated-token counter stays still.
    idle = running + waiting == 0
    moved = previous["moved"] if previous.get("busy") and generated == previous.get("generation") else clock
    samples[key] = {"at": clock, "prompt": prompt, "generation": generated, "moved": moved, "busy": not idle}
    workload.update(requests_running=running if "running" in figures else None,
                    requests_waiting=waiting if "waiting" in figures else None,
                    kv_cache_usage=figures.get("kv_cache"))
    still = clock - moved
    if idle:
        workload["health"] = "ready"
    elif generated is not None and still >= stall_after:
        workload.update(health="stalled", reason=f"{running} running, {waiting} waiting, and no token generated "
                                                 f"for {still:.0f} s")
    else:
        workload["health"] = "busy"
SIGPIPE_EXIT = 141  # what a shell reports for a program ended by SIGPIPE


def collect_workloads(facts: dict) -> list[dict]:
    """Containers grouped by their launch (sparkrun.cluster label)."""
    groups: dict[str, dict] = {}
    for host, fact in facts.items():
        if isinstance(fact, HostError):
            continue
        for container in fact.containers:
            labels = label_map(container)
            cid = labels.get("sparkrun.cluster", "")
            head = labels.get("sparkrun.head", host).rpartition("@")[2]
            group = groups.setdefault(cid, {
                "cluster_id": cid, "recipe": labels.get("sparkrun.recipe", ""),
                "runtime": labels.get("sparkrun.runtime", ""), "served_model": labels.get("sparkrun.served_model", ""),
                "endpoint": f"http://{head}:{labels.get('sparkrun.port', '')}/v1", "containers": []})
            group["containers"].append({"host": host, "name": container.get("Names"), "role": labels.get("sparkrun.role"),
                                        "image": container.get("Image"), "state": container.get("State"),
                                        "status": container.get("Status")})
    return list(groups.values())


def gpu_memory_used_mib(fact: HostFacts) -> float | None:
    """What the GPUs report in use; on a DGX Spark ([N/A]: unified memory), the sum of what
    the processes holding GPU memory use."""
    reported = [g.memory_used_mib for g in fact.gpu_load if g.memory_used_mib is not None]
    if reported:
        return sum(reported)
    return sum(mib for _, mib in fact.gpu_processes) if fact.gpu_load else None


def first_gpu_load(fact: HostFacts) -> GpuLoad:
    """The figures of the host's first GPU (a DGX Spark has one)."""
    return fact.gpu_load[0] if fact.gpu_load else GpuLoad(None, None, None, None)


def host_status_dict(host: str, fact) -> dict:
    if isinstance(fact, HostError):
        return {"host": host, "reachable": False, "error": str(fact)}
    found = {"host": host, "reachable": True, "hostname": fact.hostname, "management_ip": fact.management_ip,
             "gpu": fact.gpu, "docker_error": fact.docker_error,
             "infiniband": [d.as_dict() for d in fact.ib], "containers": len(fact.containers),
             "shmem_mib": fact.shmem_mib,
             "compile_caches": {engine: kib * 1024 for engine, kib in fact.compile_caches}}
    if fact.clock:
        first = first_gpu_load(fact)
        found.update(gpu_memory_used_mib=gpu_memory_used_mib(fact), gpu_utilization=first.utilization,
                     gpu_temperature_c=first.temperature, gpu_power_w=first.power,
                     gpu_processes=[{"pid": pid, "used_mib": mib} for pid, mib in fact.gpu_processes],
                     mem_available_mib=fact.mem_available_mib)
    return found


def status_dict(facts: dict, workloads: list, pending: list) -> dict:
    return {"hosts": [host_status_dict(h, f) for h, f in facts.items()], "workloads": workloads, "pending": pending}


def gib(mib) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f} GiB"


def number_text(value, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds % 60, "s")]
    shown = [f"{n}{u}" for n, u in parts if n][:2]
    return " ".join(shown) or "0s"


def status_lines(facts: dict, workloads: list, pending: list) -> list[str]:
    """The status as plain text lines (printed, or drawn by the live view)."""
    rows, loads = [], []
    for host, fact in facts.items():
        if isinstance(fact, HostError):
            rows.append([host, "UNREACHABLE", "", "", str(fact).partition(": ")[2]])
            continue
        ib = ", ".join(f"{d.netdev} {d.ipv4}" for d in fact.active_ib) or "none"
        state = "docker error" if fact.docker_error else "ok"
        rows.append([host, state, fact.management_ip, ib, fact.gpu or "no GPU found"])
        if fact.clock:
            first = first_gpu_load(fact)
            holders = f" ({len(fact.gpu_processes)} proc)" if fact.gpu_processes else ""
            loads.append([host, gib(gpu_memory_used_mib(fact)) + holders, number_text(first.utilization, " %"),
                          number_text(first.temperature, " C"), number_text(first.power, " W", 1),
                          gib(fact.mem_available_mib)])
    lines = table_lines(rows, ["HOST", "STATE", "MANAGEMENT IP", "INFINIBAND", "GPU / NOTE"])
    if loads:
        lines += [""] + table_lines(loads, ["HOST", "GPU MEMORY USED", "GPU UTIL", "TEMP", "POWER", "MEMORY AVAILABLE"])
    for host, fact in facts.items():
        if isinstance(fact, HostFacts) and (fact.shmem_mib or 0) >= SHARED_MEMORY_NOTE_MIB:
            running = bool(fact.other_containers) or any(c.get("State") == "running" for c in fact.containers)
            lines.append(shared_memory_note(host, fact.shmem_mib, running))
        if isinstance(fact, HostFacts) and fact.compile_caches:
            sizes = ", ".join(f"{engine} {kib / 2**20:.2f} GB" for engine, kib in fact.compile_caches)
            lines.append(f"{host}: compile caches {sizes} (empty them: sparkrun setup clear-cache --compile-caches)")
    lines.append("")
    if not workloads:
        lines.append("No sparkrun workloads running.")
    for w in workloads:
        lines.append(f"{w['recipe']} ({w['runtime']})  {w['endpoint']}  model {w['served_model']}"
                     + (f"  {w['health']}" if w.get("health") else ""))
        if w.get("health"):
            lines.append("  " + workload_figures(w))
        for c in w["containers"]:
            lines.append(f"  [{c['host']}] {c['name']}  {c['role']}  {c['image']}  {c['status']}")
        lines += [f"    | {line}" for line in w.get("last_log_lines", [])]
    lines += [f"Pending: {op['what']} (pid {op['pid']}) to {', '.join(op['hosts'])}" for op in pending]
    return lines


def workload_figures(w: dict) -> str:
    parts = [f"{w['health']}" + (f" ({w['reason']})" if w["reason"] else ""), f"up {duration(w['uptime_s'])}"]
    if w["requests_running"] is not None or w["requests_waiting"] is not None:
        parts.append(f"requests {number_text(w['requests_running'])} running, "
                     f"{number_text(w['requests_waiting'])} waiting")
    if w["interval_s"]:
        parts.append(f"tokens/s prompt {number_text(w['prompt_tokens_per_s'], digits=1)}, generation "
                     f"{number_text(w['generation_tokens_per_s'], digits=1)} (last {w['interval_s']:.1f} s)")
    if w["kv_cache_usage"] is not None:
        parts.append(f"KV cache {w['kv_cache_usage'] * 100:.0f} %")
    return "; ".join(parts)


def watch_status(monitor: StatusMonitor, interval: float, count: int | None, as_json: bool) -> int:
    """Refresh every `interval` seconds (`count` times, or until q or Ctrl+C): JSON lines, plain
    blocks (not a terminal, or NO_COLOR), or a live view drawn in place with curses."""
    live = not as_json and use_color()
    try:
        if live:
            import curses

            return curses.wrapper(lambda screen: live_view(screen, monitor, interval, count))
        for done in range(count or sys.maxsize):
            if done:
                time.sleep(interval)
            facts, workloads = monitor.refresh()
            if as_json:
                print(json.dumps({"time": time.time(), **status_dict(facts, workloads, [])}), flush=True)
            else:
                print("\n".join([watch_header(interval, "Ctrl+C quits")] + status_lines(facts, workloads, []) + [""]),
                      flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def watch_header(interval: float, keys: str) -> str:
    return f"sparkrun status at {time.strftime('%H:%M:%S')}, every {interval:g} s ({keys})"


def live_view(screen, monitor: StatusMonitor, interval: float, count: int | None) -> int:
    import curses

    curses.curs_set(0)
    for done in range(count or sys.maxsize):
        facts, workloads = monitor.refresh()
        height, width = screen.getmaxyx()
        screen.erase()
        header = watch_header(interval, "q or Ctrl+C quits, any key refreshes")
        for row, line in enumerate(([header, ""] + status_lines(facts, workloads, []))[:height]):
            screen.addnstr(row, 0, line, width - 1)
        screen.refresh()
        if done + 1 == count:
            break
        screen.timeout(int(interval * 1000))
        if screen.getch() in (ord("q"), ord("Q")):
            break
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


def registry_url(text: str) -> str:
    """A local folder as an absolute path (the air-gapped case); a URL with its path normalized
    ('/.' and 'sub/..' removed); anything else as given."""
    if "://" in text:
        import posixpath
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(text)
        return urlunsplit(parts._replace(path=posixpath.normpath(parts.path))) if parts.path else text
    path = Path(os.path.expanduser(text))
    return str(path.resolve()) if path.is_dir() else text


def recipe_count(entry: dict) -> int:
    return len(clone_files(entry, "recipes", "*.yaml"))


def cmd_registry_add(args) -> int:
    source = {"url": registry_url(args.source)}
    source.update((k, v) for k, v in (("name", args.name), ("path", args.path), ("mods", args.mods)) if v)
    added = change_registry_config(lambda config: add_source(config, source))
    for entry in added:
        hidden = "" if entry["visible"] else "; hidden, shown with --all"
        print(f"Added registry {entry['name']} ({recipe_count(entry)} recipes{hidden})")
    return 0


def cmd_registry_list(args) -> int:
    config = load_registry_config()
    rows = [{"name": e["name"], "url": e["url"], "recipes": recipe_count(e), "enabled": e.get("enabled", True),
             "visible": e.get("visible", True), "updated": e.get("updated"), "pending": False,
             "description": e.get("description", "")} for e in config["registries"]]
    rows += [{"name": s.get("name"), "url": s["url"], "recipes": None, "enabled": None, "visible": None,
              "updated": None, "pending": True, "description": ""} for s in config["pending"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No registries; add one with 'sparkrun registry add URL'.")
        return 0

    def cell(value) -> str:
        return "-" if value is None else ("yes" if value else "no") if isinstance(value, bool) else str(value)

    table = [[cell(r["name"]), r["url"], cell(r["recipes"]), cell(r["enabled"]), cell(r["visible"]),
              r["updated"] or "not fetched yet"] for r in rows]
    print_table(table, ["NAME", "URL", "RECIPES", "ENABLED", "VISIBLE", "UPDATED"])
    return 0


def cmd_registry_remove(args) -> int:
    def remove(config) -> str:
        pending = [s for s in config["pending"] if args.name in (s["url"], s.get("name"))]
        if pending:  # a default registry never fetched: stop retrying it
            config["pending"] = [s for s in config["pending"] if s not in pending]
            return f"Removed pending registry {args.name}"
        entry = registry_named(config, args.name)
        config["registries"].remove(entry)
        if all(e["clone"] != entry["clone"] for e in config["registries"]):
            shutil.rmtree(clone_path(entry["clone"]), ignore_errors=True)
        return f"Removed registry {args.name}"

    print(change_registry_config(remove))
    return 0


def cmd_registry_enable(args) -> int:
    """`registry enable` and `registry disable` (args.enabled)."""
    change_registry_config(lambda config: registry_named(config, args.name).update(enabled=args.enabled))
    print(f"Registry {args.name} {'enabled' if args.enabled else 'disabled'}")
    return 0


def cmd_registry_update(args) -> int:
    return 0 if update_registries(args.names or None) else 1


def profile_summary(ref: RecipeRef) -> dict:
    _, data = read_yaml_file(ref.path)
    data = data if isinstance(data, dict) else {}
    nested = data.get("benchmark") if isinstance(data.get("benchmark"), dict) else {}
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return {"name": ref.qualified, "registry": ref.source, "path": str(ref.path),
            "framework": str(data.get("framework") or nested.get("framework") or ""),
            "description": str(metadata.get("description", ""))}


def cmd_registry_profiles(args) -> int:
    rows = []
    for ref in benchmark_profiles():
        try:
            rows.append(profile_summary(ref))
        except RecipeError as exc:
            warn(str(exc))
    YAML_CACHE.save()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print_table([[r["name"], r["framework"], r["description"]] for r in rows],
                    ["NAME", "FRAMEWORK", "DESCRIPTION"])
    else:
        print("No benchmark profiles (registries declare them in a 'benchmarks' folder).")
    return 0


def cmd_registry_show_profile(args) -> int:
    path, data = find_benchmark_profile(args.profile)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    source = next((r.source for r in benchmark_profiles() if r.path == path), "Local")
    print(f"Name:         {path.stem}\nRepository:   {source}\nFile:         {path}\n")
    print(read_text_file(path).rstrip())
    return 0


def add_common(parser, top: bool = False) -> None:
    import argparse

    # Subcommands must not reset a count given before the command name.
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="more output; -v shows tracebacks, -vv shows every remote command")


class UnbuiltParser:
    """Stands in for the parser of a command this invocation does not run: every call on it
    is accepted and ignored."""

    _actions = ()  # read by parsers that share another command's options

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


# Commands whose parser reuses another command's options: benchmark launches as run does, and stop
# and logs accept run's whole line, so a run line edited into a stop line works.
# Occasional commands live in commands/<module>.py; their help texts stay here for the top-level help.
OCCASIONAL_COMMANDS = {"benchmark": ("benchmark", "tune"), "lab_setup": ("setup",)}
COMMAND_HELP = {
    "benchmark": "Benchmark a recipe: run it, wait until ready, run the benchmark from this machine, write the "
                 "results, stop it.",
    "tune": "Tune an engine's fused-MoE Triton kernels for a recipe's model on one host; later runs mount the "
            "configs.",
    "setup": "One-time set-up: install, completion, update, SSH mesh, CX7 networking, permissions, page cache.",
}
BUILT_WITH = {"benchmark": {"run"}, "stop": {"run"}, "logs": {"run"}}


def accept_run_options(run, parser) -> None:
    """Give `parser` every option of `run` it lacks, in a group of its own: accepted, ignored."""
    if isinstance(parser, UnbuiltParser):
        return
    taken = set(parser._option_string_actions)
    dests = {a.dest for a in parser._actions}
    group = parser.add_argument_group("run's options (accepted so a run line works here; ignored)")
    for action in run._actions:
        if action.option_strings and action.dest not in dests and not taken & set(action.option_strings):
            group._add_action(action)


def terminal_columns() -> int:
    """What shutil.get_terminal_size() says: $COLUMNS, else the terminal's width, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser(argv: list[str] | None = None):
    """The CLI. Given argv, only the parser of the command in it is built (building them all
    costs more than the rest of start-up); without argv, all of them (for completion)."""
    import argparse  # here, not at the top: shell completion never builds a parser

    class Subcommands(argparse._SubParsersAction):
        only: set | None = None

        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            unknown = getattr(namespace, argparse._UNRECOGNIZED_ARGS_ATTR, None)
            if unknown:  # the usage of the command that was given them, not the top-level one
                self.choices[values[0]].error(f"unrecognized arguments: {' '.join(unknown)}")

        def add_parser(self, name, **kwargs):
            if self.only is None or name in self.only:
                return super().add_parser(name, **kwargs)
            self.choices[name] = UnbuiltParser()  # still a valid choice, and listed on errors
            if "help" in kwargs:  # and in the top-level help
                self._choices_actions.append(self._ChoicesPseudoAction(name, (), kwargs["help"]))
            return self.choices[name]

    class Formatter(argparse.HelpFormatter):
        """argparse's own width lookup imports shutil (2 ms of every command's start-up)."""

        def __init__(self, prog, **kwargs):
            kwargs.setdefault("width", terminal_columns() - 2)
            super().__init__(prog, **kwargs)

    class Parser(argparse.ArgumentParser):  # subparsers are made with the same class
        def __init__(self, *args, **kwargs):
            super().__init__(*args, formatter_class=Formatter, **kwargs)
            self.register("action", "parsers", Subcommands)  # nested commands (recipe validate, ...) too

    parser = Parser(
        prog="sparkrun",
        description="Launch, watch and stop LLM inference servers on DGX Spark hosts over SSH.")
    parser.add_argument("--version", action="version", version=f"sparkrun {__version__}")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=Subcommands)
    if argv is not None:
        wanted = next((a for a in argv if not a.startswith("-")), None)
        sub.only = {wanted, *BUILT_WITH.get(wanted, ())} if wanted else set()

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

    def host_options(p, solo=True):
        p.add_argument("-H", "--hosts", help="comma-separated hosts; the first is the head")
        p.add_argument("--hosts-file", help="a file with one host per line (# comments allowed)")
        p.add_argument("--cluster", help="a saved cluster (default: the default cluster)")
        p.add_argument("--user", help="ssh user (default: the cluster's, else your ssh config)")
        if solo:
            p.add_argument("--solo", action="store_true", help="one host only (localhost if none given)")

    def port(text):
        return text if text == "auto" else int(text)

    p = command("run", cmd_run, "Launch a recipe: plan, check hosts, start containers, wait until ready, "
                                "follow logs (Ctrl+C detaches; the server keeps running).")
    p.add_argument("recipe", help="recipe name, @registry/name, or a path to a YAML file")
    host_options(p)
    p.add_argument("--port", type=port, help="serve port, or 'auto' for the first free one from 8000")
    p.add_argument("--tp", "--tensor-parallel", type=int, help="tensor parallel size: GPUs, one per Spark")
    p.add_argument("--gpu-mem", type=float, help="gpu_memory_utilization, a fraction in (0, 1]")
    p.add_argument("--max-model-len", type=int, help="context length")
    p.add_argument("--image", help="container image instead of the recipe's")
    p.add_argument("--pull", action="store_true",
                   help="for a moving image tag (none, :latest, a nightly): docker pull it on the head first and "
                        "give the other hosts the head's copy; a failed pull (offline) only warns")
    p.add_argument("--cache-dir", help="Hugging Face cache on the hosts (default ~/.cache/huggingface)")
    p.add_argument("-o", "--option", "--override", dest="override", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe default (repeatable)")
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan; contact no host")
    p.add_argument("--detect", action="store_true", help="with --dry-run: contact the hosts to detect "
                                                         "InfiniBand and show the real NCCL env")
    p.add_argument("--foreground", action="store_true",
                   help="the job lives as long as this command: Ctrl+C (or the log ending) stops it on every host")
    p.add_argument("--no-follow", action="store_true", help="return once the server is ready")
    p.add_argument("--replace", action="store_true", help="stop this recipe's running launch first")
    p.add_argument("--no-sync", action="store_true",
                   help="do not copy the model to the hosts (they share storage or already have it)")
    p.add_argument("--no-sync-tuning", action="store_true",
                   help="do not mount tuned MoE configs (from 'sparkrun tune' and registries)")
    p.add_argument("--download-on", choices=("auto", "here", "head"), default="auto",
                   help="where a model no one has is downloaded: here, or on the head with its Hub client "
                        "(auto: here, or the head when the Hub cannot be reached from here)")
    p.add_argument("--strict", action="store_true",
                   help="refuse to launch when the VRAM estimate does not fit, or a host has too little free memory")
    p.add_argument("--no-drop-cache", action="store_true",
                   help="do not free the hosts' page cache before starting the containers")
    p.add_argument("--ready-timeout", type=float, default=3600, help="seconds to wait for readiness (3600)")
    p.add_argument("--memory-floor", type=float, metavar="GB",
                   help="while the engines start, stop the launch when a host's available memory stays below GB "
                        f"(default {MEMORY_FLOOR_FRACTION * 100:.0f}%% of the host's memory, 6.1 GB on a DGX Spark; 0: off)")
    p.add_argument("--init-port", type=int, help="rendezvous port (vLLM 29501, SGLang 25000)")
    p.add_argument("--ray-port", type=int, help=f"Ray head port ({DEFAULT_RAY_PORT})")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard")
    p.add_argument("--dashboard-port", type=int, help=f"Ray dashboard port ({DEFAULT_DASHBOARD_PORT})")

    p = command("stop", cmd_stop, "Stop a recipe's containers (found by their labels) or all of them.")
    p.add_argument("recipe", nargs="?", help="recipe to stop")
    host_options(p, solo=False)
    p.add_argument("-a", "--all", action="store_true", help="every sparkrun container on the hosts")
    p.add_argument("--tp", "--tensor-parallel", type=int, help="only the first N hosts")
    p.add_argument("--port", type=port, help="only the launch serving on this port")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be removed")
    p.add_argument("-f", "--force", action="store_true",
                   help=f"remove at once (docker rm -f: SIGKILL) instead of giving the engines up to {STOP_GRACE_S} s "
                        "to shut down, which they need to free their shared memory in /dev/shm")

    p = command("logs", cmd_logs, "Follow a recipe's head container log (Ctrl+C stops following).")
    p.add_argument("recipe", help="recipe whose logs to show")
    host_options(p, solo=False)
    p.add_argument("--tp", "--tensor-parallel", type=int, help="only the first N hosts")
    p.add_argument("--tail", default="100", help="lines of history first (default 100, or 'all')")
    p.add_argument("--no-follow", action="store_true", help="print and exit")

    def status_options(p):
        host_options(p, solo=False)
        p.add_argument("--no-probe", action="store_true", help="hosts and containers only: no health, no figures")
        p.add_argument("--json", action="store_true", help="machine-readable output (with --watch: JSON lines)")
        p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                       help="refresh in place every SECONDS (default 2); q or Ctrl+C quits")
        p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
        p.add_argument("--check", action="store_true",
                       help=f"exit {UNHEALTHY_EXIT} when a workload is not healthy (ready or busy)")
        p.add_argument("--stall-after", type=float, default=STALL_AFTER_S, metavar="SECONDS",
                       help=f"stalled: requests there but no token generated for SECONDS ({STALL_AFTER_S:g})")

    status_options(command("status", cmd_status, "Hosts (reachable, networks, GPU load, memory) and running "
                                                 "workloads (health, requests, throughput, KV cache)."))

    cluster = sub.add_parser("cluster", help="Saved clusters: create, list, show, update, delete, default.",
                             description="Saved clusters: named host lists with an optional ssh user.")
    add_common(cluster)
    csub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    for name, func, text in (("create", cmd_cluster_create, "Save a cluster."),
                             ("update", cmd_cluster_update, "Change a cluster's hosts, description or user.")):
        p = command(name, func, text, csub)
        p.add_argument("name")
        p.add_argument("-H", "--hosts", help="comma-separated hosts; the first is the head")
        p.add_argument("--hosts-file", help="a file with one host per line")
        p.add_argument("-d", "--description", help="a note shown in listings")
        p.add_argument("--user", help="ssh user for these hosts ('' to clear, with update)")
        if name == "create":
            p.add_argument("--default", action="store_true", help="also make it the default cluster")
    p = command("list", cmd_cluster_list, "List saved clusters (* marks the default).", csub)
    p.add_argument("--json", action="store_true")
    p = command("show", cmd_cluster_show, "Show one cluster.", csub)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    command("delete", cmd_cluster_delete, "Delete a cluster.", csub).add_argument("name")
    command("set-default", cmd_cluster_set_default, "Make a cluster the default.", csub).add_argument("name")
    command("unset-default", cmd_cluster_unset_default, "Have no default cluster.", csub)
    command("default", cmd_cluster_default, "Print the default cluster's name.", csub)
    status_options(command("status", cmd_status, "Status of a cluster's hosts and workloads.", csub))

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
    p.add_argument("--tp", "--tensor-parallel", type=int, help="tensor parallel size (GPUs, one per Spark)")
    p.add_argument("--max-model-len", type=int, help="context length to budget for")
    p.add_argument("--gpu-mem", type=float, help="gpu_memory_utilization, a fraction in (0, 1]")
    p.add_argument("--cache-dir", help="Hugging Face cache root (default: $HF_HOME or ~/.cache/huggingface)")
    p.add_argument("--no-auto-detect", action="store_true",
                   help="use recipe metadata only: no config.json from the cache or the Hub")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    text = "Recipe registries (git repositories of recipes): add, list, update, enable, disable, remove."
    registry = sub.add_parser("registry", help=text, description=text)
    add_common(registry)
    gsub = registry.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    p = command("add", cmd_registry_add, "Add the registries a git repository declares (URL or local path).", gsub)
    p.add_argument("source", metavar="URL|PATH", help="git URL, file:// URL or local folder")
    p.add_argument("--name", help="registry name, for a repository without .sparkrun/registry.yaml")
    p.add_argument("--path", metavar="FOLDER", help="its recipes folder (with --name)")
    p.add_argument("--mods", metavar="FOLDER", help="its mods folder (with --name)")
    command("list", cmd_registry_list, "List registries.", gsub).add_argument(
        "--json", action="store_true", help="machine-readable output")
    command("remove", cmd_registry_remove, "Remove a registry and its local copy.", gsub).add_argument(
        "name", help="registry name, or the URL of a default registry not fetched yet")
    for name, enabled in (("enable", True), ("disable", False)):
        p = command(name, cmd_registry_enable, f"{name.capitalize()} a registry's recipes in the catalog.", gsub)
        p.add_argument("name")
        p.set_defaults(enabled=enabled)
    p = command("update", cmd_registry_update, "Fetch the newest recipes (all registries, or the named ones).",
                gsub)
    p.add_argument("names", nargs="*", metavar="NAME")
    command("list-benchmark-profiles", cmd_registry_profiles, "List the registries' benchmark profiles.",
            gsub).add_argument("--json", action="store_true", help="machine-readable output")
    p = command("show-benchmark-profile", cmd_registry_show_profile, "Show a benchmark profile.", gsub)
    p.add_argument("profile", help="profile name, @registry/name, or a path to a YAML file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for module, names in OCCASIONAL_COMMANDS.items():
        if sub.only is None or sub.only & set(names):
            command_module(module).add_parsers(sub, command, host_options)
        else:  # listed in the top-level help, and a valid choice, without importing the module
            for name in names:
                sub.add_parser(name, help=COMMAND_HELP[name])
    for name in ("stop", "logs"):
        accept_run_options(sub.choices["run"], sub.choices[name])
    return parser


def stdout_closed() -> None:
    """The reader of our stdout is gone: send the rest nowhere, so that no flush fails later."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()


def __getattr__(name: str):
    """`sparkrun.BenchmarkFramework`, the base class of benchmark plugins, lives in commands/."""
    if name == "BenchmarkFramework":
        return command_module("benchmark").BenchmarkFramework
    raise AttributeError(f"module 'sparkrun' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [COMPLETE_COMMAND]:  # shell completion: before any parser is built
        return command_module("lab_setup").run_completion(argv[1:])
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
    finally:  # --help, usage errors: flushed here, where a closed pipe is caught
        flush_stdout()
    raise_on_signals()
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(sys.stdout), PrintableStream(sys.stderr)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except SparkrunError as exc:
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(mask(f"Error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as interrupt:
        print("Interrupted.", file=sys.stderr)
        return signal_exit_code(interrupt)
    except BrokenPipeError:  # `sparkrun list | head`: the reader has all it wants
        stdout_closed()
        return SIGPIPE_EXIT
    except OSError as exc:  # a file or folder this machine refused (read-only, full, a device)
        if args.verbose or not exc.filename:
            raise
        print(f"Error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, the traceback with -v
        if args.verbose:
            raise
        print(mask(f"Error: internal error ({type(exc).__name__}: {exc}); run again with -v for the "
                   "traceback and report it"), file=sys.stderr)
        return 1
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
