"""The three ways to run: a checkout with only PyYAML, `pip install .`, and the shiv zipapp."""

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import sparkrun as sr
from conftest import REPO, isolated_env

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin") or sys.executable


def run(argv, env, **kw):
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, **kw)


def only_pyyaml(tmp_path) -> Path:
    """A folder holding PyYAML's pure-Python files and nothing else, for PYTHONPATH."""
    folder = tmp_path / "only-yaml"
    folder.mkdir()
    shutil.copytree(Path(yaml.__file__).parent, folder / "yaml", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return folder


def test_checkout_runs_with_only_pyyaml(tmp_path):
    """`python sparkrun.py` on a bare host: no site-packages but PyYAML's pure-Python files."""
    only_yaml = only_pyyaml(tmp_path)
    env = isolated_env(tmp_path, {"PYTHONPATH": str(only_yaml)})
    for args in (["--help"], ["list"], ["show", "qwen3-1.7b-vllm", "--no-vram"]):
        result = run([sys.executable, "-S", str(REPO / "sparkrun.py"), *args], env)
        assert result.returncode == 0, result.stderr
    assert "qwen3-1.7b-llama-cpp" in run([sys.executable, "-S", str(REPO / "sparkrun.py"), "list"], env).stdout


def test_checkout_runs_as_a_module_with_cached_bytecode(tmp_path):
    """`python -m sparkrun` in a checkout folder: the same commands, and the module's bytecode is
    cached (a script's never is), so later starts skip compiling the core."""
    only_yaml = only_pyyaml(tmp_path)
    env = isolated_env(tmp_path, {"PYTHONPATH": str(only_yaml), "PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")})
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for args in (["--help"], ["list"], ["show", "qwen3-1.7b-vllm", "--no-vram"]):
        result = run([sys.executable, "-S", "-m", "sparkrun", *args], env, cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert result.stdout == run([sys.executable, "-S", str(REPO / "sparkrun.py"), *args], env).stdout
    assert list((tmp_path / "pyc").rglob("sparkrun.*.pyc"))


def test_pip_install_has_console_script_and_no_generic_names(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    build = tmp_path / "src"
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".git", "dist", "build", "*.egg-info", "__pycache__"))
    result = run([str(venv / "bin" / "pip"), "install", "--quiet", str(build)],
                 os.environ)
    assert result.returncode == 0, result.stderr
    site = next(venv.glob("lib/python3*/site-packages"))
    top_level = {p.name for p in site.iterdir()}
    assert {"sparkrun.py", "sparkrun_runtimes", "sparkrun_commands", "sparkrun_recipes"} <= top_level
    assert not {"runtimes", "commands", "recipes", "tests"} & top_level
    env = isolated_env(tmp_path)
    result = run([str(venv / "bin" / "sparkrun"), "list"], env)
    assert result.returncode == 0 and "nemotron3-nano-30b-nvfp4-vllm" in result.stdout, result.stderr
    assert run([str(venv / "bin" / "sparkrun"), "--version"], env).stdout.startswith("sparkrun ")


@pytest.fixture(scope="session")
def zipapp(tmp_path_factory):
    out = tmp_path_factory.mktemp("pyz") / "sparkrun.pyz"
    result = run(["bash", str(REPO / "build_zipapp.sh"), str(out)], os.environ)
    assert result.returncode == 0, result.stderr + result.stdout
    return out


def test_zipapp_is_portable_and_runs_on_system_python(zipapp, tmp_path):
    with zipfile.ZipFile(zipapp) as archive:
        names = archive.namelist()
    compiled = [n for n in names if n.endswith((".so", ".pyd")) or ".so." in n]
    assert compiled == []
    assert any(n.endswith("huggingface_hub/__init__.py") for n in names)
    assert any(n.endswith("yaml/__init__.py") for n in names)
    env = isolated_env(tmp_path, {"SHIV_ROOT": str(tmp_path / "shiv")})
    result = run([SYSTEM_PYTHON, str(zipapp), "list"], env)
    assert result.returncode == 0, result.stderr
    assert "qwen3-1.7b-sglang" in result.stdout
    result = run([SYSTEM_PYTHON, str(zipapp), "show", "nemotron3-nano-30b-nvfp4-vllm", "--no-vram"], env)
    assert "Container:    scitrera/dgx-spark-vllm:0.16.0-t5" in result.stdout


def other_pythons() -> list[str]:
    """Every other CPython >= 3.10 this machine has (system or pyenv): the zipapp's bytecode is
    for the Python that built it; the others must run it from its sources."""
    found = {}
    for minor in range(10, 20):
        candidates = [shutil.which(f"python3.{minor}", path="/usr/bin:/usr/local/bin"),
                      *sorted(Path.home().glob(f".pyenv/versions/3.{minor}.*/bin/python3"))]
        path = next((str(c) for c in candidates if c), None)
        if path and f"3.{minor}" != f"{sys.version_info[0]}.{sys.version_info[1]}":
            found[minor] = path
    return list(found.values())


@pytest.mark.parametrize("python", other_pythons() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no other Python >= 3.10 on this machine"))])
def test_zipapp_runs_on_every_other_python(zipapp, tmp_path, python):
    env = isolated_env(tmp_path, {"SHIV_ROOT": str(tmp_path / "shiv")})
    for _ in range(2):  # the first run unpacks, the second starts from the unpacked copy
        result = run([python, str(zipapp), "show", "qwen3-1.7b-vllm", "--no-vram"], env)
        assert result.returncode == 0, result.stderr
        assert "Name:         qwen3-1.7b-vllm" in result.stdout


def test_zipapp_starts_from_its_unpacked_copy_with_bytecode_from_the_build(zipapp, tmp_path):
    """The first run unpacks through shiv's bootstrap; later runs skip it and its imports."""
    with zipfile.ZipFile(zipapp) as archive:
        assert any(n.startswith("site-packages/__pycache__/sparkrun.cpython-") for n in archive.namelist())
    env = isolated_env(tmp_path, {"SHIV_ROOT": str(tmp_path / "shiv")})

    def imported_modules():
        result = run([SYSTEM_PYTHON, "-X", "importtime", str(zipapp), "--help"], env)
        assert result.returncode == 0 and result.stdout.startswith("usage: sparkrun"), result.stderr
        return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}

    assert {"_bootstrap", "compileall"} <= imported_modules()  # first run: unpacks
    later = imported_modules()
    assert not later & {"_bootstrap", "compileall", "zipfile", "subprocess", "hashlib", "shutil"}
    assert "sparkrun" in later
    # A shiv setting in the environment still goes through shiv's bootstrap.
    env["SHIV_FORCE_EXTRACT"] = "1"
    assert "_bootstrap" in imported_modules()


@pytest.mark.parametrize("args", [["--help"], ["list"], ["show", "qwen3-1.7b-vllm", "--no-vram"],
                                  ["cluster", "list"], ["run", "qwen3-1.7b-llama-cpp", "-H", "h1", "--dry-run"]])
def test_quick_commands_import_neither_huggingface_hub_nor_network_libraries(cli, args):
    env = dict(cli.env, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "sparkrun.py"), *args],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"huggingface_hub", "httpx", "requests", "urllib.request", "http.client", "socket"}


@pytest.mark.parametrize("args", [["--help"], ["list"], ["show", "qwen3-1.7b-vllm", "--no-vram"]])
def test_warm_quick_commands_skip_slow_imports(cli, args):
    """Start-up budget guard (benchmarks/startup.py has the figures): what these commands never need."""
    def imports(*argv):
        result = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True,
                                env=cli.env, timeout=60)
        assert result.returncode == 0, result.stderr
        return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}

    imports(str(REPO / "sparkrun.py"), *args)  # fills the parsed-recipe cache
    added = imports(str(REPO / "sparkrun.py"), *args) - imports("-c", "pass")  # this Python's site imports aside
    assert not added & {"yaml", "dataclasses", "inspect", "typing", "subprocess", "difflib", "tarfile"}


def command_paths(parser, path=()):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*path, name))


def test_every_command_has_help_sized_to_the_terminal(cli):
    paths = list(command_paths(sr.build_parser()))
    assert len(paths) > 40 and ("cluster", "create") in paths
    for path in paths:
        result = cli(*path, "--help", env={"COLUMNS": "80"}, check=0)
        assert result.stdout.startswith(f"usage: {' '.join(('sparkrun',) + path)}")
        assert max(map(len, result.stdout.splitlines())) <= 80, path
    widest = {columns: max(map(len, cli("run", "--help", env={"COLUMNS": columns}, check=0).stdout.splitlines()))
              for columns in ("60", "160")}
    assert widest["60"] <= 60 < 100 < widest["160"] <= 160
