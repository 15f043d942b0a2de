#!/usr/bin/env python3
"""Median wall time of one shell completion (`sparkrun run qw<TAB>`) through the installed bash
script, as bash's `complete -F` calls it: answered by the fast path from fresh completion data,
and by the fallback `sparkrun __complete` (the installed command: `import sparkrun`, bytecode
cached) when the data is stale because clusters.yaml changed, or missing (the command tree is
built too, as after sparkrun itself changed).

Usage: python3 benchmarks/completion.py [--runs N] [--python PATH]
"""

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import timing_args

REPO = Path(__file__).resolve().parent.parent
WORDS = ("run", "qw")
EXPECTED = "qwen3-1.7b-vllm"


def median_ms(argv: list[str], env: dict, runs: int, before=None) -> float:
    """Median wall time of a command, after one warm-up run; before() runs ahead of each, untimed,
    and the command must offer EXPECTED."""
    times = []
    for run in range(runs + 1):
        if before:
            before()
        start = time.perf_counter()
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        if run:
            times.append((time.perf_counter() - start) * 1000)
        if before and EXPECTED not in out.split():
            raise SystemExit(f"the completion did not offer {EXPECTED}: {out!r}")
    return statistics.median(times)


def main() -> None:
    args = timing_args(__doc__)
    with tempfile.TemporaryDirectory() as home:
        bin_dir = Path(home) / "bin"
        bin_dir.mkdir()
        program = bin_dir / "sparkrun"
        program.write_text(f'#!/bin/sh\nexec {args.python} -c "import sys, sparkrun; sys.exit(sparkrun.main())" "$@"\n')
        program.chmod(0o755)
        env = {k: v for k, v in os.environ.items()
               if k != "PYTHONDONTWRITEBYTECODE" and not k.startswith(("SPARKRUN_", "XDG_"))}
        env.update(HOME=home, HF_HUB_OFFLINE="1", SPARKRUN_CONFIG_DIR=f"{home}/config",
                   SPARKRUN_CACHE_DIR=f"{home}/cache", SPARKRUN_DEFAULT_REGISTRIES="",
                   PYTHONPYCACHEPREFIX=f"{home}/pycache", PYTHONPATH=str(REPO), PATH=f"{bin_dir}:{env['PATH']}")
        subprocess.run(["sparkrun", "setup", "completion", "--shell", "bash"], env=env, check=True,
                       capture_output=True)
        subprocess.run(["sparkrun", "cluster", "create", "lab", "-H", "127.0.0.1"], env=env, check=True,
                       capture_output=True)
        script = Path(home) / ".local" / "share" / "bash-completion" / "completions" / "sparkrun"
        words = " ".join(("sparkrun",) + WORDS)
        complete = ["bash", "--norc", "-c", f"source {script}; COMP_WORDS=({words}); COMP_CWORD={len(WORDS)}; "
                    "_sparkrun sparkrun; printf '%s\\n' \"${COMPREPLY[@]}\""]
        clusters = Path(home) / "config" / "clusters.yaml"
        data = Path(home) / "cache" / "completion.json"

        def touch_clusters():
            os.utime(clusters)

        def remove_data():
            data.unlink(missing_ok=True)

        print(f"python {args.python}, {args.runs} runs each, median:")
        for label, argv, before in (
                ("bash -c true", ["bash", "--norc", "-c", "true"], None),
                ("fast path (fresh data)", complete, lambda: None),
                ("fallback: clusters.yaml changed", complete, touch_clusters),
                ("fallback: no data (command tree built)", complete, remove_data)):
            print(f"  {label:44s} {median_ms(argv, env, args.runs, before):6.1f} ms")


if __name__ == "__main__":
    main()
