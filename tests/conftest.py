"""Shared fixtures: run the real CLI in a subprocess with its own config and cache dirs."""

import os
import select
import subprocess
import time
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("SPARKRUN_TEST_CORPUS", REPO.parent / "shared" / "corpus"))
# The simulated hosts: 127.0.0.11-13 unless SPARKRUN_TEST_BED_OCTET moves them (two test runs at
# once on one machine must not share addresses).
BED_OCTET = int(os.environ.get("SPARKRUN_TEST_BED_OCTET", "11"))
H1, H2, H3 = (f"127.0.0.{BED_OCTET + i}" for i in range(3))


def ib_address(host: str, port: int = 2) -> str:
    """The bed's stand-in address of a host's first (port=1) or second RoCE port."""
    return f"127.10.{9 + port}.{host.rsplit('.', 1)[1]}"
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


def read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    """What a pseudo-terminal shows until `wanted` appears (or timeout, or the child closes it)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


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


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """Three simulated Sparks (127.0.0.11-13) behind real sshd daemons, for the whole session."""
    from testbed import start_bed

    bed = start_bed(tmp_path_factory, n=3, first_octet=BED_OCTET)
    yield bed
    bed.close_client_masters()
    bed.stop()


class BedCli(Cli):
    """The CLI as a user on the control machine of the test bed runs it."""

    def __init__(self, home: Path, bed):
        super().__init__(home)
        self.bed = bed
        control_bin = TESTS / "testbed" / "hostbin"
        control_state = home / "control"
        control_state.mkdir(exist_ok=True)
        self.env.update(bed.env())
        self.env.update({
            "HOME": str(home),
            "SPARKRUN_CONFIG_DIR": str(home / "config"),
            # Shared by the session so the ssh sockets (short paths) are cleaned up with the bed.
            "SPARKRUN_CACHE_DIR": str(bed.control_home / ".cache" / "sparkrun"),
            # This machine's own docker is the stand-in too, with a state of its own.
            "PATH": f"{control_bin}:{os.environ['PATH']}",
            "TESTBED_STATE": str(control_state),
            # The control machine is an x86 laptop or jump host; the Sparks are arm64.
            "TESTBED_ARCH": "amd64",
        })

    @property
    def control_state(self) -> Path:
        return Path(self.env["TESTBED_STATE"])


@pytest.fixture
def bed(testbed, tmp_path):
    """The session's bed, reset to fresh hosts, and a CLI that talks to it."""
    testbed.reset(images=True)
    for host in testbed.hosts:
        if not host.is_up:
            host.up()
    home = tmp_path / "home"
    home.mkdir()
    return BedCli(home, testbed)
