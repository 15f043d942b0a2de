"""setup: completion through the shells' own machinery, install/update, the SSH mesh, CX7 netplan
and sudo rules, end to end on the test bed (and, for sudo, with a throwaway local user)."""

import hashlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import sparkrun
from conftest import H1, H2, H3, REPO, TESTS, Cli, read_until

lab_setup = sparkrun.command_module("lab_setup")

ALL = f"{H1},{H2},{H3}"
DATA = TESTS / "setup_data"


def octet(host: str) -> str:
    return host.rsplit(".", 1)[1]


# -- completion ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    """A user with two clusters, a registry and every shell's completion installed, and a
    `sparkrun` on PATH: completions go to the real CLI; any other call prints its argv, so a line
    typed into an interactive shell shows what the completion produced."""
    tmp_path = tmp_path_factory.mktemp("shells")
    (tmp_path / "home").mkdir()
    cli = Cli(tmp_path / "home")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "sparkrun"
    program.write_text(f'#!/bin/sh\nif [ "$1" = __complete ]; then exec {sys.executable} {REPO}/sparkrun.py "$@"; fi\n'
                       'echo "ARGV: $*"\n')
    program.chmod(0o755)
    cli("cluster", "create", "lab", "-H", H1, check=0)
    cli("cluster", "create", "office", "-H", H2, check=0)
    # A registry with one recipe, as `registry add` leaves it (no network needed).
    clone = Path(cli.env["SPARKRUN_CACHE_DIR"]) / "registries" / "team"
    (clone / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "qwen3-1.7b-vllm.yaml", clone / "recipes" / "team-special.yaml")
    (Path(cli.env["SPARKRUN_CONFIG_DIR"]) / "registries.yaml").write_text(
        "registries:\n- {name: team, url: /nowhere, clone: team, recipes: recipes, enabled: true, visible: true}\n")
    for shell in lab_setup.SHELLS:
        cli("setup", "completion", "--shell", shell, check=0)
    return dict(cli.env, PATH=f"{bin_dir}:{os.environ['PATH']}", SHELL="/bin/bash")


def installed(env, shell: str) -> Path:
    home = Path(env["HOME"])
    return home / {"bash": ".local/share/bash-completion/completions/sparkrun", "zsh": ".zfunc/_sparkrun",
                   "fish": ".config/fish/completions/sparkrun.fish"}[shell]


def bash_complete(env, script: Path, *words: str) -> list[str]:
    """Call the completion function as bash's `complete -F` does (COMP_WORDS/COMP_CWORD set)."""
    array = " ".join("'" + w.replace("'", "'\\''") + "'" for w in ("sparkrun",) + words)
    code = (f"source {script}; COMP_WORDS=({array}); COMP_CWORD={len(words)}; "
            f"_sparkrun sparkrun; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    out = subprocess.run(["bash", "--norc", "-c", code], env=env, capture_output=True, text=True, timeout=30)
    return [line for line in out.stdout.splitlines() if line]


def type_into_shell(argv: list[str], env, keys: str, expect: str, timeout: float = 20) -> str:
    """Run an interactive shell on a pseudo-terminal, type `keys`, return its output once
    `expect` has appeared."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, env)
    output = b""
    try:
        time.sleep(0.3)
        os.write(fd, keys.encode())
        output = read_until(fd, expect.encode(), timeout)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)
    return output.decode(errors="replace")


def test_completion_install_is_idempotent_and_prints(cli):
    first = cli("setup", "completion", "--shell", "bash", check=0)
    path = cli.home / ".local" / "share" / "bash-completion" / "completions" / "sparkrun"
    assert f"bash completion installed: {path}" in first.stdout
    assert path.read_text() == lab_setup.completion_script("bash")
    again = cli("setup", "completion", "--shell", "bash", check=0)
    assert "already installed" in again.stdout
    for shell, where in (("zsh", ".zfunc/_sparkrun"), ("fish", ".config/fish/completions/sparkrun.fish")):
        cli("setup", "completion", "--shell", shell, check=0)
        assert (cli.home / where).read_text() == lab_setup.completion_script(shell)
    printed = cli("setup", "completion", "--print", env={"SHELL": "/usr/bin/fish"}, check=0)
    assert printed.stdout == lab_setup.completion_script("fish")
    bad = cli("setup", "completion", env={"SHELL": "/bin/tcsh"})
    assert bad.returncode == 2 and "pass --shell bash, zsh or fish" in bad.stderr


@pytest.mark.parametrize("words, expected", [
    ([""], {"run", "setup", "cluster", "registry", "list"}),
    (["setup", "c"], {"clear-cache", "completion", "cx7"}),
    (["run", "qwen3-1.7b-v"], {"qwen3-1.7b-vllm"}),
    (["run", "team-"], {"team-special"}),
    (["show", "@te"], {"@team/team-special"}),
    (["run", "x", "--cluster", ""], {"lab", "office"}),
    (["cluster", "show", "o"], {"office"}),
    (["registry", "remove", ""], {"team"}),
    (["setup", "cx7", "--sub"], {"--subnet1", "--subnet2"}),
    (["setup", "completion", "--shell", ""], {"bash", "zsh", "fish"}),
    (["setup", "completion", "--shell", "=", "z"], {"zsh"}),  # bash splits --shell=z at '='
    (["setup", "completion", "--shell", "="], {"=bash", "=zsh", "=fish"}),
    (["list", "--runtime", "sg"], {"sglang"}),
])
def test_bash_completion_function(shell_env, words, expected):
    got = set(bash_complete(shell_env, installed(shell_env, "bash"), *words))
    assert expected <= got if words == [""] else got == expected


def test_completion_never_prints_errors(cli):
    (cli.home / "config").mkdir(exist_ok=True)
    (cli.home / "config" / "clusters.yaml").write_text("clusters: [not: a: mapping")
    result = cli("__complete", "bash", "run", "x", "--cluster", "")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    # A registry not fetched yet: other commands warn about it, a completion does not.
    (cli.home / "config" / "registries.yaml").write_text(
        "registries:\n- {name: team, url: /nowhere, clone: team, recipes: recipes, enabled: true}\n")
    result = cli("__complete", "bash", "run", "qwen3-1.7b-v")
    assert result.returncode == 0 and result.stdout == "qwen3-1.7b-vllm\n" and result.stderr == ""
    assert "Warning" not in cli("setup", "completion", "--shell", "bash", check=0).stderr


def test_bash_completes_real_command_lines(shell_env, tmp_path):
    script = installed(shell_env, "bash")
    rc = tmp_path / "bashrc"
    rc.write_text(f"PS1='$ '\nbind 'set enable-bracketed-paste off' 2>/dev/null\nsource {script}\n")
    env = dict(shell_env, TERM="dumb", INPUTRC="/dev/null")
    out = type_into_shell(["bash", "--rcfile", str(rc), "-i"], env,
                          "sparkrun setup compl\t--shell=z\t\nsparkrun run qwen3-1.7b-vl\t\n"
                          "sparkrun cluster show of\t\n", expect="ARGV: cluster show office")
    assert "ARGV: setup completion --shell=zsh" in out
    assert "ARGV: run qwen3-1.7b-vllm" in out
    assert "ARGV: cluster show office" in out


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed")
def test_zsh_completes_real_command_lines(shell_env, tmp_path):
    zdot = tmp_path / "zdot"
    zdot.mkdir()
    (zdot / ".zshrc").write_text(f"PS1='$ '\nunsetopt zle_bracketed_paste 2>/dev/null\n"
                                 f"fpath=({installed(shell_env, 'zsh').parent} $fpath)\n"
                                 "autoload -Uz compinit && compinit -u\n")
    env = dict(shell_env, ZDOTDIR=str(zdot), TERM="xterm")
    out = type_into_shell(["zsh", "-i"], env, "sparkrun setup cx\t\nsparkrun run qwen3-1.7b-vl\t\n",
                          expect="ARGV: run qwen3-1.7b-vllm")
    assert "ARGV: setup cx7" in out and "ARGV: run qwen3-1.7b-vllm" in out


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed")
def test_fish_completes_command_lines(shell_env):
    script = installed(shell_env, "fish")
    code = (f"source {script}; complete -C 'sparkrun setup c'; echo SEP; complete -C 'sparkrun run qwen3-1.7b-v'; "
            "echo SEP; complete -C 'sparkrun cluster show '")
    out = subprocess.run(["fish", "--no-config", "-c", code], env=shell_env, capture_output=True, text=True,
                         timeout=30).stdout
    setup, recipes, clusters = ({line.split("\t")[0] for line in part.splitlines() if line}
                                for part in out.split("SEP\n"))
    assert setup == {"clear-cache", "completion", "cx7"}
    assert recipes == {"qwen3-1.7b-vllm"}
    assert clusters == {"lab", "office"}


@pytest.fixture
def spied(tmp_path):
    """A user whose `sparkrun` is a copy of sparkrun.py (a file of its own, to touch) that logs
    every `__complete` call, i.e. every time the fast path found no fresh data; completion
    installed for every shell by that copy. Commands other than `setup` print their argv; calling
    the fixture runs the checkout's sparkrun.py, as `cli` does."""
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(home)
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "sparkrun.py", app / "sparkrun.py")
    for folder in ("recipes", "runtimes", "commands"):
        (app / folder).symlink_to(REPO / folder)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "fallbacks"
    (bin_dir / "sparkrun").write_text(
        f'#!/bin/sh\ncase "$1" in\n  __complete) echo "$*" >> {log};;\n  setup) ;;\n  *) echo "ARGV: $*"; exit;;\n'
        f'esac\nexec {sys.executable} {app}/sparkrun.py "$@"\n')
    (bin_dir / "sparkrun").chmod(0o755)
    env = dict(cli.env, PATH=f"{bin_dir}:{os.environ['PATH']}", SHELL="/bin/bash")
    for shell in lab_setup.SHELLS:
        subprocess.run(["sparkrun", "setup", "completion", "--shell", shell], env=env, check=True,
                       capture_output=True)
    cli.env = env
    cli.app = app
    cli.fallbacks = lambda: log.read_text().splitlines() if log.exists() else []
    return cli


def test_completion_program_fits_in_single_quotes_and_finds_the_cache(monkeypatch, tmp_path):
    assert "'" not in lab_setup.COMPLETION_PROGRAM and "\\" not in lab_setup.COMPLETION_PROGRAM
    program = lab_setup.completion_program()
    for env in ({"SPARKRUN_CACHE_DIR": str(tmp_path / "c")}, {"XDG_CACHE_HOME": str(tmp_path / "x")},
                {"HOME": str(tmp_path / "h")}):
        for name in ("SPARKRUN_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert program["data_file"]() == str(sparkrun.cache_dir() / "completion.json")


def test_fast_path_answers_without_sparkrun(spied, tmp_path):
    assert bash_complete(spied.env, installed(spied.env, "bash"), "run", "qwen3-1.7b-v") == ["qwen3-1.7b-vllm"]
    assert bash_complete(spied.env, installed(spied.env, "bash"), "setup", "completion", "--shell", "=", "z") == ["zsh"]
    if shutil.which("fish"):
        out = subprocess.run(["fish", "--no-config", "-c", f"source {installed(spied.env, 'fish')}; "
                              "complete -C 'sparkrun setup cx'"], env=spied.env, capture_output=True, text=True,
                             timeout=30).stdout
        assert out.split() == ["cx7"]
    if shutil.which("zsh"):
        zdot = tmp_path / "zdot"
        zdot.mkdir()
        (zdot / ".zshrc").write_text(f"PS1='$ '\nunsetopt zle_bracketed_paste 2>/dev/null\n"
                                     f"fpath=({installed(spied.env, 'zsh').parent} $fpath)\n"
                                     "autoload -Uz compinit && compinit -u\n")
        out = type_into_shell(["zsh", "-i"], dict(spied.env, ZDOTDIR=str(zdot), TERM="xterm"),
                              "sparkrun run qwen3-1.7b-vl\t\n", expect="ARGV: run qwen3-1.7b-vllm")
        assert "ARGV: run qwen3-1.7b-vllm" in out
    assert spied.fallbacks() == []
    # Without the Python that installed the scripts, python3 runs the fast path.
    script = tmp_path / "gone-python"
    script.write_text(installed(spied.env, "bash").read_text().replace(f"python={sys.executable}",
                                                                      "python=/nonexistent/python3"))
    assert "python=/nonexistent/python3" in script.read_text()
    assert bash_complete(spied.env, script, "run", "qwen3-1.7b-v") == ["qwen3-1.7b-vllm"]
    assert spied.fallbacks() == []


def test_completion_data_follows_changes(spied, tmp_path):
    script = installed(spied.env, "bash")

    def complete(*words, env=spied.env):
        return bash_complete(env, script, *words)

    assert complete("cluster", "show", "") == [] and spied.fallbacks() == []
    spied("cluster", "create", "lab", "-H", H1, check=0)
    assert complete("cluster", "show", "") == ["lab"]  # stale: sparkrun answered, and wrote the data again
    assert spied.fallbacks() == ["__complete bash cluster show "]
    assert complete("run", "x", "--cluster", "l") == ["lab"] and len(spied.fallbacks()) == 1
    # A registry as `registry add` leaves it, then a `registry update` that brings recipes in a
    # new subfolder, then one more in that subfolder only.
    recipes = Path(spied.env["SPARKRUN_CACHE_DIR"]) / "registries" / "team" / "recipes"
    recipes.mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "qwen3-1.7b-vllm.yaml", recipes / "team-special.yaml")
    (Path(spied.env["SPARKRUN_CONFIG_DIR"]) / "registries.yaml").write_text(
        "registries:\n- {name: team, url: /nowhere, clone: team, recipes: recipes, enabled: true, visible: true}\n")
    assert complete("show", "@te") == ["@team/team-special"] and len(spied.fallbacks()) == 2
    (recipes / "more").mkdir()
    shutil.copy(recipes / "team-special.yaml", recipes / "more" / "team-extra.yaml")
    assert complete("run", "team-") == ["team-extra", "team-special"] and len(spied.fallbacks()) == 3
    shutil.copy(recipes / "team-special.yaml", recipes / "more" / "team-third.yaml")
    assert complete("run", "team-") == ["team-extra", "team-special", "team-third"]
    assert complete("registry", "remove", "") == ["team"] and len(spied.fallbacks()) == 4
    # Another config folder: other names.
    other = dict(spied.env, SPARKRUN_CONFIG_DIR=str(tmp_path / "other"))
    assert complete("cluster", "show", "", env=other) == [] and len(spied.fallbacks()) == 5
    assert complete("cluster", "show", "") == ["lab"] and len(spied.fallbacks()) == 6
    # sparkrun itself changed: it answers once, and writes the data (its tree too) again.
    data_file = Path(spied.env["SPARKRUN_CACHE_DIR"]) / "completion.json"
    me = str(spied.app / "sparkrun.py")
    before = json.loads(data_file.read_text())["files"][me]
    stat = os.stat(me)
    os.utime(me, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert complete("setup", "cx") == ["cx7"] and len(spied.fallbacks()) == 7
    after = json.loads(data_file.read_text())["files"][me]
    assert after != before and after[1] == stat.st_mtime_ns + 10**9
    assert complete("setup", "cx") == ["cx7"] and len(spied.fallbacks()) == 7


def test_completion_follows_registry_add_and_update(spied, tmp_path):
    git = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]
    repo = tmp_path / "team-repo"
    (repo / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "qwen3-1.7b-vllm.yaml", repo / "recipes" / "team-special.yaml")

    def commit():
        for args in (["add", "-A"], ["commit", "-q", "-m", "recipes"]):
            subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)

    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    commit()
    script = installed(spied.env, "bash")
    assert bash_complete(spied.env, script, "run", "team-") == []
    spied("registry", "add", repo, "--name", "team", "--path", "recipes", check=0)
    assert bash_complete(spied.env, script, "run", "team-") == ["team-special"]
    shutil.copy(REPO / "recipes" / "qwen3-1.7b-vllm.yaml", repo / "recipes" / "team-extra.yaml")
    commit()
    spied("registry", "update", check=0)
    assert bash_complete(spied.env, script, "run", "team-") == ["team-extra", "team-special"]
    assert bash_complete(spied.env, script, "registry", "update", "t") == ["team"]
    assert len(spied.fallbacks()) == 2


# -- install and update -------------------------------------------------------------

@pytest.fixture
def fake_uv(tmp_path):
    """A `uv` on PATH that records its argv, one JSON list per line."""
    bin_dir = tmp_path / "uvbin"
    bin_dir.mkdir()
    log = tmp_path / "uv-calls"
    (bin_dir / "uv").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "uv").chmod(0o755)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}, calls


def test_install_from_checkout_uses_uv_and_sets_up_completion(cli, fake_uv):
    env, calls = fake_uv
    result = cli("setup", "install", env=dict(env, SHELL="/bin/bash"), check=0)
    assert calls() == [["tool", "install", str(REPO)]]
    assert json.loads((cli.home / "config" / "install.json").read_text()) == {"method": "uv", "source": str(REPO)}
    assert "bash completion installed" in result.stdout
    assert (cli.home / ".local" / "share" / "bash-completion" / "completions" / "sparkrun").is_file()


def test_install_without_uv_says_how_to_get_it(cli):
    result = cli("setup", "install", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and lab_setup.UV_HINT in result.stderr
    assert not (cli.home / "config" / "install.json").exists()


def test_update_pulls_the_recorded_checkout_and_reinstalls(cli, fake_uv, tmp_path):
    env, calls = fake_uv
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    origin, src, other = tmp_path / "origin.git", tmp_path / "src", tmp_path / "other"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(other)], check=True)
    (other / "a").write_text("1")
    subprocess.run(git + ["-C", str(other), "add", "a"], check=True)
    subprocess.run(git + ["-C", str(other), "commit", "-qm", "one"], check=True)
    subprocess.run(git + ["-C", str(other), "push", "-q", str(origin), "main"], check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(src)], check=True, capture_output=True)
    (other / "a").write_text("2")
    subprocess.run(git + ["-C", str(other), "commit", "-qam", "two"], check=True)
    subprocess.run(git + ["-C", str(other), "push", "-q", str(origin), "main"], check=True, capture_output=True)
    (cli.home / "config").mkdir()
    (cli.home / "config" / "install.json").write_text(json.dumps({"method": "uv", "source": str(src)}))
    result = cli("setup", "update", "--no-update-registries", env=env, check=0)
    assert (src / "a").read_text() == "2" and "updated" in result.stderr
    assert calls() == [["tool", "install", "--force", str(src)]]


def test_pyz_installs_itself_once_then_updates_from_its_source(cli, tmp_path):
    """argv[0] is the zipapp (shiv keeps it so); the copy goes to ~/.local/bin/sparkrun."""
    pyz = tmp_path / "sparkrun.pyz"
    with zipfile.ZipFile(pyz, "w") as archive:
        archive.writestr("__main__.py", f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                                        "import sparkrun\nsys.exit(sparkrun.main())\n")
    target = cli.home / ".local" / "bin" / "sparkrun"

    def run(*args):
        return subprocess.run([sys.executable, str(pyz), *args], env=cli.env, capture_output=True, text=True,
                              timeout=60)
    first = run("setup", "install", "--no-completion")
    assert first.returncode == 0 and f"Installed {pyz} as {target}" in first.stdout, first.stderr
    assert target.read_bytes() == pyz.read_bytes() and os.access(target, os.X_OK)
    assert "is already installed" in run("setup", "install", "--no-completion").stdout
    with zipfile.ZipFile(pyz, "a") as archive:
        archive.writestr("NEWER", "1")
    updated = run("setup", "update", "--no-update-registries")
    assert f"Updated {target} from {pyz}" in updated.stdout and target.read_bytes() == pyz.read_bytes()


# -- SSH mesh -----------------------------------------------------------------------

def ssh_files(bed) -> dict:
    """Checksums of every ~/.ssh file on the hosts and on the control machine."""
    homes = {h.id: h.home for h in bed.bed.hosts} | {"control": bed.home}
    return {f"{who}:{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for who, home in homes.items() for p in sorted((home / ".ssh").glob("*"))}


def reached_from(host, others) -> set:
    """The hosts `host` logs in to by address, never prompting (its own key and known_hosts)."""
    loop = " ".join(o.addr for o in others)
    result = host.ssh(f"for a in {loop}; do ssh -n -o BatchMode=yes -o StrictHostKeyChecking=yes "
                      "-o ConnectTimeout=5 $a hostname; done")
    return {line.strip() for line in result.stdout.splitlines()} & {o.id for o in others}


@pytest.fixture
def mesh_bed(bed):
    if not bed.bed.isolated:
        pytest.skip("needs hosts with private home folders (mount namespaces)")
    return bed


def test_ssh_mesh_from_nothing_then_idempotent(mesh_bed):
    bed = mesh_bed
    hosts = bed.bed.hosts
    assert reached_from(hosts[0], hosts[1:]) == set()  # at first they accept only the control machine's key
    keep = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDkeep someone@else"
    (hosts[0].home / ".ssh").mkdir(exist_ok=True)
    (hosts[0].home / ".ssh" / "authorized_keys").write_text(keep)  # no final newline
    first = bed("setup", "ssh", "-H", ALL)
    assert first.returncode == 0, first.stderr
    assert lab_setup.MESH_DONE in first.stdout
    assert re.search(r"this machine +key created, \+3 authorized keys, \+3 known_hosts entries", first.stdout)
    for host in hosts:
        assert re.search(rf"{re.escape(host.addr)} +key created, \+3 authorized keys, \+2 known_hosts entries",
                         first.stdout), first.stdout
    for host in hosts:
        others = [o for o in hosts if o is not host]
        assert reached_from(host, others) == {o.id for o in others}, host
    authorized = (hosts[0].home / ".ssh" / "authorized_keys").read_text()
    assert authorized.startswith(keep + "\n") and authorized.count("ssh-ed25519") == 3
    before = ssh_files(bed)
    second = bed("setup", "ssh", "-H", ALL)
    assert second.returncode == 0, second.stderr
    assert lab_setup.MESH_UNCHANGED in second.stdout and second.stdout.count("unchanged") == 4
    assert ssh_files(bed) == before


def test_ssh_mesh_never_rewrites_a_conflicting_known_host(mesh_bed, tmp_path):
    bed = mesh_bed
    h1 = bed.bed.hosts[0]
    (h1.home / ".ssh").mkdir(exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "old")], check=True)
    stale = f"{H2} {' '.join((tmp_path / 'old.pub').read_text().split()[:2])}\n"  # a reinstalled host's old key
    (h1.home / ".ssh" / "known_hosts").write_text(stale)
    result = bed("setup", "ssh", "-H", ALL, "--no-include-self")
    assert result.returncode == 1
    assert f"known_hosts already has a different ssh-ed25519 key for {H2}; left alone" in result.stderr
    assert f"{H1} -> {H2}" in result.stderr and "the mesh is incomplete" in result.stderr
    assert (h1.home / ".ssh" / "known_hosts").read_text().startswith(stale)
    assert not (bed.home / ".ssh" / "id_ed25519").exists()  # --no-include-self leaves this machine alone


def test_ssh_mesh_refused_login_without_a_terminal(mesh_bed):
    result = mesh_bed("setup", "ssh", "-H", H1, "--user", "nosuchuser", "--no-include-self")
    assert result.returncode == 1
    assert "ssh refused our key; run 'sparkrun setup ssh' on a terminal" in result.stderr


# -- CX7 networking -----------------------------------------------------------------

@pytest.fixture
def netplan(bed):
    """A recording `netplan` on every host; CX7 ports without addresses."""
    for host in bed.bed.hosts:
        shutil.copy(DATA / "netplan", host.bin / "netplan")
        host.set_ib([{"hca": "rocep1s0f1", "netdev": "enp1s0f1np1"},
                     {"hca": "roceP2p1s0f1", "netdev": "enP2p1s0f1np1"}])
    yield bed
    for host in bed.bed.hosts:
        (host.bin / "netplan").unlink()
        for path in [host.root / "netplan-calls", *(host.root / "etc" / "netplan").glob("*")]:
            path.unlink(missing_ok=True)


def netplan_calls(host) -> list[str]:
    path = host.root / "netplan-calls"
    return path.read_text().splitlines() if path.exists() else []


SUBNETS = ("--subnet1", "127.20.1.0/24", "--subnet2", "127.20.2.0/24")


def test_cx7_dry_run_prints_each_hosts_netplan(netplan):
    result = netplan("setup", "cx7", "-H", ALL, *SUBNETS, "--dry-run")
    assert result.returncode == 0, result.stderr
    template = (DATA / "cx7-netplan.yaml").read_text()
    for host in netplan.bed.hosts:
        block = result.stdout.split(f"{host.addr}: /etc/netplan/{lab_setup.NETPLAN_FILE}\n")[1]
        assert block.startswith(template.format(octet=octet(host.addr)))
        assert netplan_calls(host) == [] and not list((host.root / "etc" / "netplan").iterdir())
    assert re.search(rf"{re.escape(H1)} +enp1s0f1np1 +up +9000 +-", result.stdout)


def test_cx7_without_yes_or_terminal_applies_nothing(netplan):
    result = netplan("setup", "cx7", "-H", ALL, *SUBNETS)
    assert result.returncode == 2 and lab_setup.NOT_CONFIRMED in result.stderr
    assert all(netplan_calls(h) == [] for h in netplan.bed.hosts)


def test_cx7_yes_writes_applies_learns_addresses_then_keeps(netplan):
    bed = netplan
    result = bed("setup", "cx7", "-H", ALL, *SUBNETS, "--yes")
    assert result.returncode == 0, result.stderr
    template = (DATA / "cx7-netplan.yaml").read_text()
    for host in bed.bed.hosts:
        written = host.root / "etc" / "netplan" / lab_setup.NETPLAN_FILE
        assert written.read_text() == template.format(octet=octet(host.addr))
        assert oct(written.stat().st_mode & 0o777) == "0o600"
        digest = hashlib.md5(written.read_bytes()).hexdigest()[:8]
        assert netplan_calls(host) == ["netplan generate", f"  {lab_setup.NETPLAN_FILE} 600 {digest}",
                                       "netplan apply", f"  {lab_setup.NETPLAN_FILE} 600 {digest}"]
        assert f"{host.addr}: netplan applied" in result.stdout
    # Every host (and this machine) knows the others' host keys under their new addresses.
    h1, h3 = bed.bed.hosts[0], bed.bed.hosts[2]
    key = (h3.sshd_dir / "host_ed25519.pub").read_text().split()[1]
    for address in (f"127.20.1.{octet(H3)}", f"127.20.2.{octet(H3)}"):
        for known in (h1.home / ".ssh" / "known_hosts", bed.home / ".ssh" / "known_hosts"):
            found = subprocess.run(["ssh-keygen", "-F", address, "-f", str(known)], capture_output=True, text=True)
            assert key in found.stdout, (address, known)
    # The links come up with the new addresses: the next run keeps them and changes nothing.
    for host in bed.bed.hosts:
        host.set_ib([{"hca": "rocep1s0f1", "netdev": "enp1s0f1np1", "ipv4": f"127.20.1.{octet(host.addr)}"},
                     {"hca": "roceP2p1s0f1", "netdev": "enP2p1s0f1np1", "ipv4": f"127.20.2.{octet(host.addr)}"}])
    again = bed("setup", "cx7", "-H", ALL, *SUBNETS, "--yes")
    assert again.returncode == 0, again.stderr
    assert "already configured (127.20.1.0/24, 127.20.2.0/24, MTU 9000); kept" in again.stdout
    assert "already knows the CX7 addresses" in again.stdout
    assert all(len(netplan_calls(h)) == 4 for h in bed.bed.hosts)


def test_cx7_keeps_a_valid_configuration_unless_forced(netplan):
    bed = netplan
    for host in bed.bed.hosts:
        host.set_ib(None)  # the bed's default: 127.10.10.x/24 and 127.10.11.x/24, MTU 9000
    kept = bed("setup", "cx7", "-H", ALL, "--dry-run")
    assert kept.returncode == 0 and "already configured (127.10.10.0/24, 127.10.11.0/24, MTU 9000)" in kept.stdout
    forced = bed("setup", "cx7", "-H", ALL, *SUBNETS, "--dry-run", "--force")
    assert f"addresses: [127.20.2.{octet(H2)}/24]" in forced.stdout
    assert all(netplan_calls(h) == [] for h in bed.bed.hosts)


def test_cx7_invalid_netplan_restores_the_previous_file(netplan):
    bed = netplan
    h1 = bed.bed.hosts[0]
    previous = h1.root / "etc" / "netplan" / lab_setup.NETPLAN_FILE
    previous.write_text("# the admin's own\n")
    h1.fault("netplan_invalid")
    result = bed("setup", "cx7", "-H", H1, *SUBNETS, "--yes")
    assert result.returncode == 1 and "netplan failed (exit 3)" in result.stderr
    assert previous.read_text() == "# the admin's own\n"
    assert [c for c in netplan_calls(h1) if c.startswith("netplan")] == ["netplan generate"]


def test_cx7_refuses_to_cut_the_connection_it_runs_over():
    port = lab_setup.Cx7Port("enp1s0f1np1", "0000:01:00.1", "up", 9000, True, ("10.0.0.5/24",))
    host = lab_setup.Cx7Host("10.0.0.5", "10.0.0.5", 22, (port,))
    with pytest.raises(sparkrun.UsageError, match="reaches it through enp1s0f1np1"):
        lab_setup.cx7_changes([host], {"10.0.0.5": [(port, "192.168.100.5/24")]}, 9000)
    assert lab_setup.cx7_changes([host], {"10.0.0.5": [(port, "10.0.0.5/24")]}, 9000) == {}


@pytest.mark.parametrize("args, message", [
    (["--subnet1", "10.0.0.0/16", "--subnet2", "10.1.0.0/24"], "must be an IPv4 /24"),
    (["--subnet1", "10.0.0.0/24"], "--subnet1 and --subnet2 go together"),
    (["--subnet1", "10.0.0.0/24", "--subnet2", "10.0.0.0/24"], "must differ"),
    (["--mtu", "100"], "--mtu must be between"),
])
def test_cx7_bad_options(cli, args, message):
    result = cli("setup", "cx7", "-H", H1, *args)
    assert result.returncode == 2 and message in result.stderr


# -- permissions, page cache and sudo rules -------------------------------------------

def test_sudoers_rule_is_one_exact_command():
    rule = lab_setup.sudoers_rule("alice", ["/usr/bin/chown", "-hR", "alice:alice", "/data/hf"], "test")
    assert rule.splitlines()[-1] == r"alice ALL=(root) NOPASSWD: /usr/bin/chown -hR alice\:alice /data/hf"
    assert lab_setup.sudoers_rule("bob", ["/usr/bin/tee", sparkrun.DROP_CACHES], "t").splitlines()[-1] == \
        "bob ALL=(root) NOPASSWD: /usr/bin/tee /proc/sys/vm/drop_caches"
    for bad in ("/data/*", "/data/hf x", "/data/[a]", "/data/h?"):
        with pytest.raises(sparkrun.UsageError):
            lab_setup.sudoers_rule("alice", ["/usr/bin/chown", "-hR", "alice:alice", bad], "test")
    with pytest.raises(sparkrun.UsageError):
        lab_setup.sudoers_rule("al ice", ["/usr/bin/tee", "/x"], "test")
    assert lab_setup.sudoers_file("first.last", "chown-cache") == "/etc/sudoers.d/sparkrun-chown-cache-first_last"


@pytest.mark.skipif(not shutil.which("visudo"), reason="visudo is not installed (apt-get install sudo)")
def test_sudoers_rules_pass_visudo(tmp_path):
    for rule in (lab_setup.sudoers_rule("alice", ["/usr/bin/chown", "-hR", "alice:alice", "/home/alice/.cache/hf"],
                                       "x"),
                 lab_setup.sudoers_rule("alice", ["/usr/bin/tee", sparkrun.DROP_CACHES], "y")):
        path = tmp_path / "rule"
        path.write_text(rule)
        result = subprocess.run(["visudo", "-cf", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_fix_permissions_and_clear_cache_on_the_bed(bed):
    h1 = bed.bed.hosts[0]
    hub = h1.home / ".cache" / "huggingface" / "hub" / "models--x"
    hub.mkdir(parents=True)
    (hub / "weights").write_text("w")
    os.chown(hub / "weights", 12345, 12345)  # what a container running as another uid leaves behind
    result = bed("setup", "fix-permissions", "-H", H1, "--save-sudo")
    assert result.returncode == 0, result.stderr
    assert "1 entries given back to root:root" in result.stdout and "root needs no sudo rule" in result.stdout
    assert (hub / "weights").stat().st_uid == 0
    again = bed("setup", "fix-permissions", "-H", H1)
    assert "already belongs to root:root; nothing changed" in again.stdout
    refused = bed("setup", "fix-permissions", "-H", H1, "--cache-dir", "/etc")
    assert refused.returncode == 2 and "does not look like a Hugging Face cache" in refused.stderr
    missing = bed("setup", "fix-permissions", "-H", H2)
    assert "no cache at" in missing.stdout and missing.returncode == 0
    cleared = bed("setup", "clear-cache", "-H", f"{H1},{H2}")
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.count("synced and dropped the page cache") == 2
    assert (h1.root / "drop_caches").read_text() == "3\n"


# A throwaway local user shows the sudo side for real: rules in /etc/sudoers.d, `sudo -l`, and
# the password typed once on a terminal. The commands run "on" localhost (bash, no ssh).

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin") or sys.executable
needs_root_and_sudo = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("sudo", "visudo", "useradd", "userdel", "runuser")),
    reason="needs root, sudo, visudo, useradd and runuser")


@pytest.fixture
def local_user():
    name = f"srt{os.getpid() % 100000}"
    home = Path("/home") / name
    subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/bash", name], check=True)
    created = []
    yield {"name": name, "home": home, "sudoers": created}
    for path in created + list(Path("/etc/sudoers.d").glob(f"sparkrun-*-{name}")):
        Path(path).unlink(missing_ok=True)
    subprocess.run(["userdel", "-r", name], capture_output=True)


def grant(user, commands: str, nopasswd: bool = True):
    path = Path("/etc/sudoers.d") / f"zz-test-{user['name']}"
    path.write_text(f"{user['name']} ALL=(root) {'NOPASSWD: ' if nopasswd else ''}{commands}\n")
    path.chmod(0o440)
    user["sudoers"].append(path)
    assert subprocess.run(["visudo", "-c"], capture_output=True).returncode == 0
    return path


def as_user(user, *args, env=None):
    environ = {"HOME": str(user["home"]), "PATH": "/usr/local/bin:/usr/bin:/bin", "NO_COLOR": "1",
               "SPARKRUN_CONFIG_DIR": str(user["home"] / "config"), "SPARKRUN_CACHE_DIR": str(user["home"] / "cache"),
               **(env or {})}
    return ["runuser", "-u", user["name"], "--", "env", "-i", *(f"{k}={v}" for k, v in environ.items()),
            SYSTEM_PYTHON, str(REPO / "sparkrun.py"), *args]


def sudo_list(user) -> list[str]:
    out = subprocess.run(["sudo", "-l", "-U", user["name"]], capture_output=True, text=True).stdout
    return [line.strip() for line in out.split("may run the following commands")[1].splitlines()[1:] if line.strip()]


@needs_root_and_sudo
def test_save_sudo_allows_exactly_the_chown(local_user):
    user, name = local_user, local_user["name"]
    cache = user["home"] / ".cache" / "huggingface"
    (cache / "hub").mkdir(parents=True)
    subprocess.run(["chown", "-R", f"{name}:{name}", str(user["home"])], check=True)
    bootstrap = grant(user, "/usr/sbin/visudo, /usr/bin/install, /usr/bin/mv, /usr/bin/rm")
    saved = subprocess.run(as_user(user, "setup", "fix-permissions", "-H", "localhost", "--save-sudo"),
                           capture_output=True, text=True, timeout=60)
    assert saved.returncode == 0, saved.stderr
    rule_file = Path(lab_setup.sudoers_file(name, "chown-cache"))
    assert f"sudo rule saved: {rule_file}" in saved.stdout
    bootstrap.unlink()
    stat = rule_file.stat()
    assert (oct(stat.st_mode & 0o777), stat.st_uid, stat.st_gid) == ("0o440", 0, 0)
    assert subprocess.run(["visudo", "-cf", str(rule_file)], capture_output=True).returncode == 0
    assert sudo_list(user) == [f"(root) NOPASSWD: /usr/bin/chown -hR {name}\\:{name} {cache}"]
    # Files a container wrote as root come back without a password, through that rule only.
    (cache / "hub" / "blob").write_text("x")
    fixed = subprocess.run(as_user(user, "setup", "fix-permissions", "-H", "localhost"),
                           capture_output=True, text=True, timeout=60)
    assert fixed.returncode == 0 and "1 entries given back" in fixed.stdout, fixed.stderr
    assert (cache / "hub" / "blob").owner() == name
    for other in ([f"{name}:{name}", "/etc/hostname"], [name, str(cache)]):
        attempt = subprocess.run(["runuser", "-u", name, "--", "sudo", "-n", "/usr/bin/chown", "-hR", *other],
                                 capture_output=True, text=True)
        assert attempt.returncode != 0
    before = rule_file.read_bytes()
    again = subprocess.run(as_user(user, "setup", "fix-permissions", "-H", "localhost", "--save-sudo"),
                           capture_output=True, text=True, timeout=60)
    assert "no rule needed" in again.stdout and rule_file.read_bytes() == before


@needs_root_and_sudo
def test_clear_cache_asks_the_sudo_password_once_then_saves_the_rule(local_user, tmp_path):
    user, name = local_user, local_user["name"]
    password = "pw-" + os.urandom(4).hex()
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    grant(user, "/usr/bin/tee, /usr/sbin/visudo, /usr/bin/install, /usr/bin/mv, /usr/bin/rm", nopasswd=False)
    target = user["home"] / "drop_caches"  # stands in for /proc/sys/vm/drop_caches
    env = {"SPARKRUN_DROP_CACHES": str(target), "TERM": "dumb"}
    argv = as_user(user, "setup", "clear-cache", "-H", "localhost", "--save-sudo", env=env)
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    output = b""
    sent = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if not sent and b"sudo password for" in output:
            os.write(fd, (password + "\n").encode())
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert text.count("sudo password for") == 1 and password not in text
    assert "synced and dropped the page cache" in text and target.read_text() == "3\n"
    rule_file = Path(lab_setup.sudoers_file(name, "drop-caches"))
    assert f"sudo rule saved: {rule_file}" in text
    for path in user["sudoers"]:
        path.unlink()
    user["sudoers"].clear()
    assert sudo_list(user) == [f"(root) NOPASSWD: /usr/bin/tee {target}"]
    target.unlink()
    quiet = subprocess.run(as_user(user, "setup", "clear-cache", "-H", "localhost", env=env),
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert quiet.returncode == 0, quiet.stderr
    assert target.read_text() == "3\n"


@needs_root_and_sudo
def test_sudo_password_needed_without_a_terminal_is_a_clear_error(local_user):
    user = local_user
    grant(user, "/usr/bin/tee", nopasswd=False)
    result = subprocess.run(as_user(user, "setup", "clear-cache", "-H", "localhost",
                                    env={"SPARKRUN_DROP_CACHES": str(user["home"] / "x")}),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: " + lab_setup.SUDO_NEEDS_TTY.format(hosts="localhost")
