"""What the benchmarks share: timing a command, the test bed (simulated Sparks behind real sshd
on loopback), and running sparkrun against it as a user would."""

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from testbed import TestBed  # noqa: E402


@contextlib.contextmanager
def bed(n_hosts: int, first_octet: int):
    """A started bed plus the environment for a sparkrun on its control machine. Its hosts start
    at 127.0.0.<first_octet>, or at SPARKRUN_TEST_BED_OCTET when set (as the tests' do)."""
    first_octet = int(os.environ.get("SPARKRUN_TEST_BED_OCTET", first_octet))
    with tempfile.TemporaryDirectory(prefix="sr-bench-") as work:
        testbed = TestBed(Path(work) / "bed", n_hosts=n_hosts, first_octet=first_octet).start()
        try:
            home = Path(work) / "home"
            home.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKRUN_", "HF_", "XDG_"))}
            env.update(testbed.env())
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # run as an installed command: bytecode cached
            env.update({"HOME": str(home), "SPARKRUN_CONFIG_DIR": str(home / "config"),
                        "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(Path(work) / "pycache"),
                        "SPARKRUN_CACHE_DIR": str(testbed.control_home / ".cache" / "sparkrun"),
                        "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "SPARKRUN_DEFAULT_REGISTRIES": "",
                        "PATH": f"{REPO / 'tests' / 'testbed' / 'hostbin'}:{os.environ['PATH']}",
                        "TESTBED_STATE": str(home / "control")})
            (home / "control").mkdir()
            yield testbed, env, home
        finally:
            testbed.close_client_masters()
            testbed.stop()


PYTHON = os.environ.get("SPARKRUN_BENCH_PYTHON", sys.executable)


def sparkrun(env: dict, *args, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """(wall seconds, result) of one sparkrun command, run as the installed command runs
    (`import sparkrun`, bytecode cached) by SPARKRUN_BENCH_PYTHON (default: this Python)."""
    start = time.perf_counter()
    result = subprocess.run([PYTHON, "-c", "import sys, sparkrun; sys.exit(sparkrun.main())", *map(str, args)],
                            env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise SystemExit(f"sparkrun {' '.join(map(str, args))} failed:\n{result.stderr}")
    return elapsed, result


def median_ms(values) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms"


def runs_parser(doc: str, runs: int):
    """An argument parser with --runs (default `runs`); doc's first line describes the script."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs)
    return parser


def timing_args(doc: str):
    """--runs and --python, the options every start-up timing script takes."""
    parser = runs_parser(doc, 21)
    parser.add_argument("--python", default=sys.executable)
    return parser.parse_args()


def command_median_ms(argv: list[str], env: dict, runs: int) -> float:
    """Median wall time of a command, after one warm-up run."""
    subprocess.run(argv, env=env, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
