#!/usr/bin/env python3
"""Median wall time of `sparkrun list` with 3 registries of ~100 recipes in all, warm caches.

Usage: python3 benchmarks/registry_list.py [--runs N] [--python PATH]
Builds three git repositories from the recipe corpus in a temporary folder (nothing leaves this
machine), adds them as registries, then times `sparkrun list` run as the installed command does
(importing the module, bytecode cached) and as `python3 sparkrun.py list` (compiled every run).
Also prints the interpreter's own start-up time for reference.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import command_median_ms, timing_args

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SPARKRUN_TEST_CORPUS", REPO.parent / "shared" / "corpus"))
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "-c", "init.defaultBranch=main"]
# registry name -> corpus recipe folders copied into its `recipes` folder
REGISTRIES = {
    "arena": ["spark-arena-recipe-registry/official-recipes", "spark-arena-recipe-registry/experimental-recipes"],
    "eugr": ["eugr-spark-vllm-docker/recipes"],
    "community": ["sparkrun-formerly-bundled/recipes", "dbotwinick-sparkrun-recipe-registry/testing/recipes",
                  "dbotwinick-sparkrun-recipe-registry/transitional/recipes"],
}


def make_repo(path: Path, folders: list[str]) -> None:
    for folder in folders:
        shutil.copytree(CORPUS / folder, path / "recipes" / folder.replace("/", "-"))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "recipes"]):
        subprocess.run([*GIT, *args], cwd=path, check=True)


def main() -> None:
    args = timing_args(__doc__)
    with tempfile.TemporaryDirectory() as home:
        # Bytecode cached (in the temporary folder), as for an installed package.
        env = dict(os.environ, HOME=home, SPARKRUN_CONFIG_DIR=f"{home}/config", PYTHONPATH=str(REPO),
                   SPARKRUN_CACHE_DIR=f"{home}/cache", SPARKRUN_DEFAULT_REGISTRIES="",
                   PYTHONPYCACHEPREFIX=f"{home}/pycache")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        script = [args.python, str(REPO / "sparkrun.py")]
        for name, folders in REGISTRIES.items():
            make_repo(Path(home) / name, folders)
            subprocess.run([*script, "registry", "add", f"{home}/{name}", "--name", name, "--path", "recipes"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        listed = subprocess.run([*script, "list"], env=env, capture_output=True, text=True, check=True)
        installed = [args.python, "-c", "import sys, sparkrun; sys.exit(sparkrun.main())"]
        print(f"python {args.python}, {len(REGISTRIES)} registries, {len(listed.stdout.splitlines()) - 1} "
              f"recipes listed, {args.runs} runs each, median:")
        print(f"  {'python -c pass':40s} {command_median_ms([args.python, '-c', 'pass'], env, args.runs):6.1f} ms")
        installed_ms = command_median_ms(installed + ["list"], env, args.runs)
        print(f"  {'sparkrun list (installed command)':40s} {installed_ms:6.1f} ms")
        print(f"  {'python3 sparkrun.py list':40s} {command_median_ms(script + ['list'], env, args.runs):6.1f} ms")


if __name__ == "__main__":
    main()
