"""Shared fixtures: run the real CLI in a subprocess with its own config and cache dirs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("SPARKRUN_TEST_CORPUS", REPO.parent / "shared" / "corpus"))
for entry in (str(REPO), str(TESTS)):
    if entry not in sys.path:
        sys.path.insert(0, entry)


def isolated_env(home: Path, extra: dict | None = None) -> dict:
    """Environment for a sparkrun subprocess that touches nothing of the real user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKRUN_", "HF_", "XDG_"))}
    env.update({
        "HOME": str(home),
        "SPARKRUN_CONFIG_DIR": str(home / "config"),
        "SPARKRUN_CACHE_DIR": str(home / "cache"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        # Tests never reach the internet: no default registries unless a test names its own.
        "SPARKRUN_DEFAULT_REGISTRIES": "",
        "NO_COLOR": "1",
    })
    env.update(extra or {})
    return env


class Cli:
    """Runs `python sparkrun.py ...` as a user would."""

    def __init__(self, home: Path):
        self.home = home
        self.env = isolated_env(home)

    def __call__(self, *args, input=None, timeout=120, env=None, check=None):
        merged = dict(self.env, **(env or {}))
        result = subprocess.run([sys.executable, str(REPO / "sparkrun.py"), *map(str, args)],
                                capture_output=True, text=True, input=input, timeout=timeout,
                                env=merged, stdin=None if input is not None else subprocess.DEVNULL)
        if check is not None:
            assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
        return result


@pytest.fixture
def cli(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)
