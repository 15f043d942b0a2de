#!/usr/bin/env python3
"""Median wall time of sparkrun's quick commands (`--help`, `list`, `show`), warm caches, in the
ways sparkrun runs: the installed command (`import sparkrun`, bytecode cached), the zipapp when
dist/sparkrun.pyz exists, and from a checkout: `python sparkrun.py` (which recompiles the file on
every start: Python never caches a script's own bytecode) and `python -m sparkrun` run in the
checkout folder (a module: its bytecode is cached in __pycache__ from the first run on).

Usage: python3 benchmarks/startup.py [--runs N] [--python PATH]
"""

import os
import tempfile
from pathlib import Path

from common import command_median_ms, timing_args

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (["--help"], ["list"], ["show", "nemotron3-nano-30b-nvfp4-vllm"])


def main() -> None:
    args = timing_args(__doc__)
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(HOME=home, HF_HUB_OFFLINE="1", SPARKRUN_CONFIG_DIR=f"{home}/config",
                   SPARKRUN_CACHE_DIR=f"{home}/cache", SPARKRUN_DEFAULT_REGISTRIES="",
                   PYTHONPYCACHEPREFIX=f"{home}/pycache", SHIV_ROOT=f"{home}/shiv", PYTHONPATH=str(REPO))
        forms = {"installed command": [args.python, "-c", "import sys, sparkrun; sys.exit(sparkrun.main())"],
                 "python sparkrun.py": [args.python, str(REPO / "sparkrun.py")],
                 "python -m sparkrun": [args.python, "-m", "sparkrun"]}
        if (REPO / "dist" / "sparkrun.pyz").exists():
            forms["dist/sparkrun.pyz"] = [args.python, str(REPO / "dist" / "sparkrun.pyz")]
        print(f"python {args.python}, {args.runs} runs each, median:")
        print(f"  {'python -c pass':48s} {command_median_ms([args.python, '-c', 'pass'], env, args.runs):6.1f} ms")
        for form, prefix in forms.items():
            for extra in COMMANDS:
                label = f"{form}: sparkrun {' '.join(extra)}"
                print(f"  {label:48s} {command_median_ms(prefix + extra, env, args.runs):6.1f} ms")


if __name__ == "__main__":
    main()
