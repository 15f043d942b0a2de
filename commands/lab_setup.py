"""sparkrun setup: one-time lab chores, imported only when `setup` (or shell completion) runs.

install, completion, update, the SSH mesh, CX7 networking, cache permissions and the page cache.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from sparkrun import (
    COMMAND_HELP,
    AuthRefused,
    FolderError,
    GitError,
    HERE,
    HostError,
    HostKeyMismatch,
    HostSelection,
    LOCAL_HOSTS,
    REMOTE_COMPILE_CACHE,
    RUNTIMES,
    Record,
    RemoteFailed,
    RemoteResult,
    SECRET_VALUES,
    SSH,
    SparkrunError,
    UsageError,
    YAML_CACHE,
    add_common,
    atomic_write,
    build_parser,
    bundled_refs,
    check_cli_value,
    clusters_path,
    config_dir,
    drop_caches_target,
    enabled_registries,
    git,
    parse_host_list,
    print_table,
    quote_path,
    raise_first,
    read_clusters,
    read_yaml_file,
    registries_file,
    registry_folder,
    registry_refs,
    remote_cache_root,
    remote_join,
    resource_dir,
    say,
    select_hosts,
    update_registries,
    warn,
)


# One-time lab chores. Each is safe to run twice: it looks first, changes only what is missing,
# says what it changed, and never removes a key, an entry or a working setting. Remote work goes
# through SSH.run like everything else. A command that needs root runs as root directly, else
# through `sudo -n`, else with the sudo password typed once here and sent on ssh's stdin after
# the script (never in an argv). Remote scripts are one function called on their last line, so
# bash has read the whole script before anything reads stdin.

SHELLS = ("bash", "zsh", "fish")
PYZ_TARGET = Path("~/.local/bin/sparkrun")
UV_HINT = ("uv is not installed. Get it with 'curl -LsSf https://astral.sh/uv/install.sh | sh' "
           "(or 'pipx install uv') and run 'sparkrun setup install' again; or build the single-file "
           "sparkrun.pyz (./build_zipapp.sh) and run 'dist/sparkrun.pyz setup install', which needs no uv")
SUDO_NEEDS_TTY = ("sudo on {hosts} asks for a password: run this on a terminal to type it once, or save "
                  "a rule with --save-sudo from a terminal first")
SUDO_BAD_PASSWORD = "sudo did not accept the password"
MESH_UNCHANGED = "SSH mesh already complete: nothing changed."
MESH_DONE = "SSH mesh complete: every host reaches every other host with BatchMode=yes."
NOT_CONFIRMED = "nothing applied: pass --yes, or run on a terminal to confirm"
NETPLAN_FILE = "90-sparkrun-cx7.yaml"  # sorts after the distribution's files, so its settings win
CX7_SUBNETS = ("192.168.100.0/24", "192.168.101.0/24")
MELLANOX_VENDOR = "0x15b3"
SUDOERS_DIR = "/etc/sudoers.d"
# Characters a sudoers command argument may hold here. Wildcards (* ? [ ]) and spaces never pass,
# so a saved rule allows exactly one command line.
SUDOERS_SAFE = re.compile(r"[A-Za-z0-9._/+@:=,-]+")
UNIX_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
PUBKEY_RE = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( [^\n]*)?")


# -- install and update --------------------------------------------------------

def install_record_path() -> Path:
    return config_dir() / "install.json"


def read_install_record() -> dict:
    try:
        data = json.loads(install_record_path().read_text())
    except (OSError, ValueError):
        return {}
    known = isinstance(data, dict) and data.get("method") in ("pyz", "uv") and isinstance(data.get("source"), str)
    return data if known else {}  # anything else was not written by sparkrun: as if there were none


def running_pyz() -> Path | None:
    """The zipapp this process runs from. shiv unpacks the code elsewhere, so argv[0] tells."""
    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if first is None or first.suffix == ".py" or not first.is_file():
        return None
    import zipfile

    try:
        with zipfile.ZipFile(first) as archive:
            return first.resolve() if "__main__.py" in archive.namelist() else None
    except (OSError, zipfile.BadZipFile):
        return None


def installation() -> tuple[str, Path]:
    """How this sparkrun runs: ("pyz", file), ("checkout", folder), ("uv", folder) or ("pip", folder)."""
    pyz = running_pyz()
    if pyz:
        return "pyz", pyz
    if (HERE / "pyproject.toml").is_file():
        return "checkout", HERE
    return ("uv" if "/uv/tools/" in str(HERE) else "pip"), HERE


def run_tool(argv: list[str], what: str) -> None:
    """A local installer command, its output shown as it goes."""
    say(f"$ {shlex.join(argv)}")
    try:
        code = subprocess.run(argv, stdin=subprocess.DEVNULL).returncode
    except FileNotFoundError:
        raise SparkrunError(f"{argv[0]} is not installed") from None
    if code:
        raise SparkrunError(f"{what} failed (exit {code})")


def copy_pyz(source: Path) -> bool:
    """Copy the zipapp to ~/.local/bin/sparkrun (atomically); False when it is already there."""
    target = PYZ_TARGET.expanduser()
    if target.exists() and (target.resolve() == source.resolve() or target.read_bytes() == source.read_bytes()):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return True


def path_hint(folder: Path) -> None:
    if str(folder) not in os.environ.get("PATH", "").split(os.pathsep):
        warn(f"{folder} is not on your PATH; add it (e.g. in ~/.profile: export PATH=\"{folder}:$PATH\")")


def cmd_setup_install(args) -> int:
    method, where = installation()
    if method == "pyz":
        changed = copy_pyz(where)
        target = PYZ_TARGET.expanduser()
        print(f"Installed {where} as {target}" if changed else f"sparkrun is already installed as {target}")
        atomic_write(install_record_path(), json.dumps({"method": "pyz", "source": str(where)}) + "\n")
        path_hint(target.parent)
    elif method == "checkout":
        uv = shutil.which("uv")
        if not uv:
            raise SparkrunError(UV_HINT)
        run_tool([uv, "tool", "install", str(where)], "uv tool install")
        atomic_write(install_record_path(), json.dumps({"method": "uv", "source": str(where)}) + "\n")
        print(f"Installed sparkrun from {where} as a uv tool")
    else:
        print(f"sparkrun is already installed ({method}, {where})")
    if not args.no_completion:
        try:
            install_completion(default_shell())
        except UsageError as exc:
            warn(f"{exc}; shell completion not set up")
    return 0


def pull_checkout(folder: Path) -> None:
    """git pull --ff-only in a clean clone that tracks a branch; anything else is left alone."""
    if not (folder / ".git").exists():
        return
    try:
        git("rev-parse", "--abbrev-ref", "@{upstream}", cwd=folder)
    except GitError:
        say(f"{folder}: no upstream branch; installing it as it is")
        return
    if git("status", "--porcelain", "--untracked-files=no", cwd=folder).strip():
        warn(f"{folder} has local changes; not pulling, installing it as it is")
        return
    before = git("rev-parse", "--short", "HEAD", cwd=folder).strip()
    git("pull", "--quiet", "--ff-only", cwd=folder)
    after = git("rev-parse", "--short", "HEAD", cwd=folder).strip()
    say(f"{folder}: " + (f"up to date ({after})" if before == after else f"updated {before} -> {after}"))


def cmd_setup_update(args) -> int:
    record = read_install_record()
    method, where = installation()
    wanted = record.get("method") or method
    source = Path(record["source"]) if record.get("source") else None
    if wanted == "uv":
        uv = shutil.which("uv")
        if not uv:
            raise SparkrunError(UV_HINT)
        if source and source.is_dir():
            pull_checkout(source)
            run_tool([uv, "tool", "install", "--force", str(source)], "uv tool install")
        else:
            run_tool([uv, "tool", "upgrade", "sparkrun"], "uv tool upgrade")
    elif wanted == "pyz":
        if source and source.is_file() and copy_pyz(source):
            print(f"Updated {PYZ_TARGET.expanduser()} from {source}")
        else:
            print("sparkrun.pyz is up to date; to upgrade, run a newer sparkrun.pyz with 'setup install'")
    elif wanted == "checkout":
        print(f"sparkrun runs from the checkout {where}; update it with git there "
              "(or 'sparkrun setup install' to install it as a uv tool)")
    else:
        print(f"sparkrun was installed with pip at {where}; upgrade it with pip")
    if args.no_update_registries:
        return 0
    return 0 if update_registries() else 1


# -- shell completion ----------------------------------------------------------
# A completion must take well under 50 ms, and importing this file alone takes about that long.
# So the shell scripts first run COMPLETION_PROGRAM, a small stdlib-only program they embed, as
# `python -I -S -c PROGRAM SHELL WORD...` (the words after the program name, the last one being
# completed). It answers from cache_dir()/completion.json: the command tree, the recipe, cluster
# and registry names, and the size, mtime and inode of every file and folder those come from (this
# file or the zipapp, clusters.yaml, registries.yaml, the recipe folders); when anything changed
# since, it exits STALE and the script runs `sparkrun __complete SHELL WORD...` (checked first in
# main()), which writes the data again and answers from it through the same program, so both
# answer alike. That path builds the argparse parser only when sparkrun itself changed and reads
# YAML through the parsed-YAML cache; nothing is ever printed but candidates. The program holds
# no ' and no backslash: the scripts quote it in single quotes, in every shell.

COMPLETION_PROGRAM = r'''"""sparkrun shell completion: the candidates for the last word typed after sparkrun."""
import json, os, sys

FORMAT = 1  # of the data file: data of another format is stale
STALE = 3  # exit status: no fresh data, ask sparkrun (which writes it again)
CONFIG_ENV = ("SPARKRUN_CONFIG_DIR", "XDG_CONFIG_HOME", "HOME")  # where the config files are
WORDBREAKS = "><=;|&(:"  # bash splits words there (its COMP_WORDBREAKS, quotes aside)


def data_file():
    """completion.json in sparkrun cache_dir()."""
    env = os.environ.get
    cache = env("SPARKRUN_CACHE_DIR") or os.path.join(env("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                      "sparkrun")
    return os.path.join(cache, "completion.json")


def identity(path):
    """[size, mtime_ns, inode] of a file or folder (a file replaced whole has another inode); None
    when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def fresh(data):
    """Nothing the data was made from has changed since."""
    return (data.get("format") == FORMAT and data["env"] == {name: os.environ.get(name) for name in CONFIG_ENV}
            and all(identity(path) == known for path, known in data["files"].items()))


def values(data, kind, current):
    """What an argument takes: its choices, the names of a kind (recipe, cluster, registry), or nothing."""
    if isinstance(kind, list):
        return kind
    if kind == "recipe" and current.startswith("@"):
        kind = "@recipe"  # @registry/name
    return data["names"].get(kind, [])


def join_bash_words(words):
    """bash splits --opt=val and a:b into several words; put them back together. Returns the
    words and how many characters of the last one bash does not count as the current word."""
    joined = []
    glue = False
    for word in words:
        if joined and (glue or (word and word[0] in WORDBREAKS)):
            joined[-1] += word
        else:
            joined.append(word)
        glue = bool(word) and word[-1] in "=:"
    head = len(joined[-1]) - len(words[-1]) if joined else 0
    return joined, head


def complete_words(data, words):
    """Candidates for the last of words (the arguments after the program name)."""
    *done, current = words or [""]
    node, expecting, positional = data["tree"], None, 0
    options = dict(node["options"])
    for word in done:
        if expecting is not None:
            expecting = None
        elif word.startswith("-") and word != "-":
            if "=" not in word and options.get(word) is not None:
                expecting = options[word]
        elif positional == 0 and word in node["commands"]:
            node = node["commands"][word]
            options.update(node["options"])
        else:
            positional += 1
    if expecting is not None:
        found = values(data, expecting, current)
    elif current.startswith("--") and "=" in current:
        option, _, value = current.partition("=")
        kind = options.get(option)
        found = [option + "=" + v for v in values(data, kind, value)] if kind is not None else []
    elif current.startswith("-"):
        found = list(node["options"])
    else:
        found = list(node["commands"]) if positional == 0 else []
        slots = node["positionals"]
        if slots:
            kind, repeats = slots[min(positional, len(slots) - 1)]
            if positional < len(slots) or repeats:
                found += values(data, kind, current)
    return sorted({v for v in found if v.startswith(current)})


def candidates(data, shell, words):
    """What the shell offers for the last of words."""
    head = 0
    if shell == "bash" and words:
        words, head = join_bash_words(words)
    return [candidate[head:] for candidate in complete_words(data, words)]


def main(argv):
    """SHELL WORD...: print the candidates, or exit STALE when the data is missing or stale."""
    try:
        with open(data_file()) as handle:
            data = json.load(handle)
        if not fresh(data):
            return STALE
        found = candidates(data, argv[0], argv[1:])
    except Exception:  # no data yet, or not readable as such
        return STALE
    for candidate in found:
        print(candidate)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

# The scripts: @PYTHON@ is the Python that ran `setup completion` (python3 when it is gone).
BASH_COMPLETION = r'''# sparkrun completion for bash (written by 'sparkrun setup completion')
# _sparkrun_fast answers from the data sparkrun keeps for completion without starting sparkrun;
# when that data is missing or out of date, sparkrun answers itself (and writes it again).
_sparkrun() {
    local IFS=$'\n' program=${COMP_WORDS[0]/#\~/$HOME} python=@PYTHON@
    [[ -x $python ]] || python=python3
    COMPREPLY=($("$python" -I -S -c "$_sparkrun_fast" bash "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null ||
               command "$program" __complete bash "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null))
}
complete -o default -o bashdefault -F _sparkrun sparkrun sparkrun.pyz
_sparkrun_fast='@PROGRAM@'
'''

ZSH_COMPLETION = r'''#compdef sparkrun sparkrun.pyz
# sparkrun completion for zsh (written by 'sparkrun setup completion')
# _sparkrun_fast answers from the data sparkrun keeps for completion without starting sparkrun;
# when that data is missing or out of date, sparkrun answers itself (and writes it again).
_sparkrun() {
    local -a candidates
    local python=@PYTHON@
    [[ -x $python ]] || python=python3
    candidates=("${(@f)$("$python" -I -S -c "$_sparkrun_fast" zsh "${(@)words[2,CURRENT]}" 2>/dev/null ||
                        command ${~words[1]} __complete zsh "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    if [[ -n ${candidates[1]} ]]; then
        compadd -- "${candidates[@]}"
    else
        _files
    fi
}
typeset -g _sparkrun_fast='@PROGRAM@'
if [[ $funcstack[1] == _sparkrun ]]; then _sparkrun "$@"; else compdef _sparkrun sparkrun sparkrun.pyz; fi
'''

FISH_COMPLETION = r'''# sparkrun completion for fish (written by 'sparkrun setup completion')
# __sparkrun_fast answers from the data sparkrun keeps for completion without starting sparkrun;
# when that data is missing or out of date, sparkrun answers itself (and writes it again).
function __sparkrun_complete
    set -l words (commandline -opc)
    set -l current (commandline -ct)
    set -l python @PYTHON@
    test -x "$python"; or set python python3
    set -l candidates ($python -I -S -c $__sparkrun_fast fish $words[2..-1] $current 2>/dev/null
                       or command $words[1] __complete fish $words[2..-1] $current 2>/dev/null)
    if test (count $candidates) -eq 0
        __fish_complete_path $current
    else
        printf '%s\n' $candidates
    end
end
set -g __sparkrun_fast '@PROGRAM@'
complete -c sparkrun -f -a '(__sparkrun_complete)'
complete -c sparkrun.pyz -f -a '(__sparkrun_complete)'
'''

COMPLETION_SCRIPTS = {"bash": BASH_COMPLETION, "zsh": ZSH_COMPLETION, "fish": FISH_COMPLETION}


def default_shell() -> str:
    name = Path(os.environ.get("SHELL", "")).name
    if name not in SHELLS:
        raise UsageError(f"cannot tell your shell from SHELL={os.environ.get('SHELL', '')!r}; "
                         "pass --shell bash, zsh or fish")
    return name


def completion_path(shell: str) -> Path:
    home = Path(os.path.expanduser("~"))
    data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return {"bash": data / "bash-completion" / "completions" / "sparkrun",
            "zsh": Path(os.environ.get("ZDOTDIR") or home) / ".zfunc" / "_sparkrun",
            "fish": config / "fish" / "completions" / "sparkrun.fish"}[shell]


def completion_hint(shell: str, path: Path) -> str | None:
    """What the user must add to their shell's start-up file, if anything."""
    if shell == "bash" and not any(Path(p).is_file() for p in ("/usr/share/bash-completion/bash_completion",
                                                                  "/etc/bash_completion")):
        return f"bash-completion is not installed; add to ~/.bashrc: source {path}"
    if shell == "zsh":
        rc = Path(os.environ.get("ZDOTDIR") or os.path.expanduser("~")) / ".zshrc"
        text = rc.read_text() if rc.is_file() else ""
        if str(path.parent) not in text and ".zfunc" not in text:
            return (f"add to {rc}, before compinit: fpath=({path.parent} $fpath); autoload -Uz compinit && compinit")
    return None


def completion_script(shell: str) -> str:
    """The script for `shell`, with COMPLETION_PROGRAM in it, run by this Python."""
    python = sys.executable or "python3"
    quoted = ("'" + python.replace("\\", "\\\\").replace("'", "\\'") + "'" if shell == "fish"
              else shlex.quote(python))
    return COMPLETION_SCRIPTS[shell].replace("@PYTHON@", quoted).replace("@PROGRAM@", COMPLETION_PROGRAM)


def install_completion(shell: str) -> None:
    path = completion_path(shell)
    script = completion_script(shell)
    if path.is_file() and path.read_text() == script:
        print(f"{shell} completion is already installed: {path}")
    else:
        atomic_write(path, script)
        print(f"{shell} completion installed: {path} (new shells complete sparkrun)")
    try:
        write_completion_data()  # the first completion is fast too
    except Exception:
        pass
    hint = completion_hint(shell, path)
    if hint:
        print(f"Note: {hint}")


def cmd_setup_completion(args) -> int:
    shell = args.shell or default_shell()
    if args.print:
        sys.stdout.write(completion_script(shell))
        return 0
    install_completion(shell)
    return 0


def completion_kind(path: tuple, action) -> object:
    """What values an argument takes: a list of choices, a kind of name, or "" (anything)."""
    if action.choices:
        return [str(c) for c in action.choices]
    dest = action.dest
    if dest in ("recipe", "recipes"):
        return "recipe"
    if dest == "cluster" or (path[:1] == ("cluster",) and dest == "name" and path[-1] != "create"):
        return "cluster"
    if path[:1] == ("registry",) and dest in ("name", "names") and not action.option_strings:
        return "registry"
    if dest == "runtime":
        return sorted(set(RUNTIMES) | {"vllm"})
    return ""


def completion_tree(parser, path: tuple = ()) -> dict:
    """The commands, options and positionals of a parser, as plain data."""
    import argparse

    node = {"commands": {}, "options": {}, "positionals": []}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            hidden = {a.dest for a in action._choices_actions if a.help == argparse.SUPPRESS}
            for name, sub in action.choices.items():
                if name not in hidden:
                    node["commands"][name] = completion_tree(sub, path + (name,))
        elif action.help != argparse.SUPPRESS:
            kind = completion_kind(path, action)
            if action.option_strings:
                for option in action.option_strings:
                    node["options"][option] = None if action.nargs == 0 else kind
            else:
                node["positionals"].append([kind, action.nargs in ("*", "+")])
    return node


_COMPLETION: dict = {}


def completion_program() -> dict:
    """COMPLETION_PROGRAM's names (candidates, identity, data_file, FORMAT, ...), for sparkrun."""
    if not _COMPLETION:
        _COMPLETION["__name__"] = "sparkrun_completion"  # not "__main__": it defines, runs nothing
        exec(COMPLETION_PROGRAM, _COMPLETION)
    return _COMPLETION


def completion_names(files: dict) -> dict:
    """The recipe, cluster and registry names to complete. Adds to `files` the identity of each
    file and folder they come from, taken before reading it: a change meanwhile leaves the data
    stale, never wrong."""
    identity = completion_program()["identity"]

    def watch(*paths: Path) -> None:
        files.update((str(path), identity(path)) for path in paths)

    def attempt(produce) -> list:  # a file that cannot be read leaves out its own names only
        try:
            return produce()
        except Exception:
            return []

    def registry_names() -> list:
        data = read_yaml_file(registries_file())[1] or {}
        return [str(e["name"]) for e in data.get("registries") or [] if isinstance(e, dict) and "name" in e]

    watch(clusters_path(), registries_file(), resource_dir("recipes"))
    has_registries = registries_file().exists()  # never the first-use fetch from a completion
    roots = attempt(lambda: [registry_folder(e, "recipes") for e in enabled_registries()]) if has_registries else []
    for root in filter(None, roots):  # registry_refs() reads the subfolders too
        watch(root, *(Path(folder) for folder, _, _ in os.walk(root)))
    refs = bundled_refs() + (attempt(registry_refs) if has_registries else [])
    return {"recipe": [r.name for r in refs if r.visible], "@recipe": [f"@{r.source}/{r.name}" for r in refs],
            "cluster": attempt(lambda: sorted(map(str, read_clusters()["clusters"]))),
            "registry": attempt(registry_names) if has_registries else []}


def write_completion_data() -> dict:
    """Write, and return, the data COMPLETION_PROGRAM answers from (see there). The command tree
    is built again only when this sparkrun file changed; the names every time."""
    import contextlib
    import io

    program = completion_program()
    path = Path(program["data_file"]())
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and old.get("format") == program["FORMAT"]
            and isinstance(old.get("files"), dict) and isinstance(old.get("tree"), dict)):
        old = {"files": {}}  # not what this function wrote: made again
    # The zipapp rather than this file: an updated zipapp unpacks elsewhere, leaving this one as it was.
    me = str(running_pyz() or Path(sys.modules["sparkrun"].__file__).resolve())
    files = {me: program["identity"](me)}
    unchanged = files[me] is not None and old["files"].get(me) == files[me]
    tree = old["tree"] if unchanged else completion_tree(build_parser())
    with contextlib.redirect_stderr(io.StringIO()):  # warnings (a registry not fetched) are for other commands
        names = completion_names(files)
    data = {"format": program["FORMAT"], "env": {name: os.environ.get(name) for name in program["CONFIG_ENV"]},
            "files": files, "names": names, "tree": tree}
    YAML_CACHE.save()
    if data != old:
        try:
            atomic_write(path, json.dumps(data))
        except FolderError:
            pass  # a read-only cache only costs speed
    return data


def run_completion(argv: list[str]) -> int:
    """The hidden entry point, for when the data is missing or stale: writes it and answers from
    it as the scripts do. Never fails, never prints anything but candidates."""
    try:
        shell, words = (argv[0], argv[1:]) if argv and argv[0] in SHELLS else ("bash", argv)
        for candidate in completion_program()["candidates"](write_completion_data(), shell, words):
            print(candidate)
    except Exception:  # a completion must never show a traceback in the middle of a command line
        pass
    return 0


# -- running things as root on the hosts ---------------------------------------

AS_ROOT_SH = r'''
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; return; fi
  local err rc
  err=$(mktemp) || return 1
  if [ -n "$SUDO_PW" ] && [ -z "$SUDO_CHECKED" ]; then
    if ! printf '%s\n' "$SUDO_PW" | sudo -S -p '' -v 2>"$err"; then
      echo "@@badpw" >&2; cat "$err" >&2; rm -f "$err"; exit 43
    fi
    SUDO_CHECKED=1
  fi
  sudo -n -- "$@" 2>"$err"; rc=$?
  if [ $rc -ne 0 ] && grep -q "password is required" "$err"; then rm -f "$err"; echo "@@needpw" >&2; exit 42; fi
  cat "$err" >&2; rm -f "$err"; return $rc
}
'''


def root_script(body: str, *helpers: str) -> str:
    """A remote script whose `as_root CMD...` runs CMD as root (see AS_ROOT_SH); stdin may carry
    the sudo password after the script. helpers: more bash functions the body calls."""
    return ("main() {\n  IFS= read -r SUDO_PW || SUDO_PW=\n" + body.rstrip() + "\n}\n"
            + AS_ROOT_SH + "".join(helpers) + "main\n")


def ask_sudo_password(hosts: list[str], user: str | None) -> str:
    if not sys.stdin.isatty():
        raise SparkrunError(SUDO_NEEDS_TTY.format(hosts=", ".join(hosts)))
    import getpass

    who = user or "your user"
    password = getpass.getpass(f"sudo password for {who} on {', '.join(hosts)}: ")
    if password:
        SECRET_VALUES.add(password)
    return password


def run_as_root(ssh: SSH, hosts: list[str], script_for, *, what: str, timeout: float = 300) -> dict:
    """Run root_script()s; hosts whose sudo wants a password get it, asked once, on a second try.
    Returns each host's RemoteResult, or its HostError (sudo refusals included)."""
    results = ssh.run_all(hosts, script_for, timeout=timeout)
    need = [h for h, r in results.items() if isinstance(r, RemoteResult) and r.returncode == 42
            and "@@needpw" in r.stderr]
    if need:
        password = ask_sudo_password(need, ssh.user)
        results.update(ssh.run_all(need, script_for, timeout=timeout, stdin_data=(password + "\n").encode()))
    for host, result in results.items():
        if isinstance(result, HostError) or result.ok:
            continue
        if "@@badpw" in result.stderr:
            results[host] = RemoteFailed(host, SUDO_BAD_PASSWORD)
        elif "@@needpw" in result.stderr:
            results[host] = RemoteFailed(host, "sudo still asks for a password")
        else:
            results[host] = RemoteFailed(host, f"{what} failed (exit {result.returncode}): "
                                               f"{result.stderr_tail() or result.stdout.strip()[-300:]}")
    return results


def sudoers_word(word: str) -> str:
    """One sudoers command word, escaped; anything that could widen the rule is refused."""
    if not SUDOERS_SAFE.fullmatch(word):
        raise UsageError(f"cannot write a sudo rule for {word!r}: only letters, digits and ._/+@-:=, are allowed")
    return re.sub(r"([\\,:=])", r"\\\1", word)


def sudoers_rule(user: str, argv: list[str], purpose: str) -> str:
    """The whole sudoers.d file: exactly one command line, as root, without a password."""
    if not UNIX_NAME.fullmatch(user):
        raise UsageError(f"cannot write a sudo rule for user {user!r}")
    if not argv or not argv[0].startswith("/"):
        raise UsageError("a sudo rule needs the command's absolute path")
    command = " ".join(sudoers_word(a) for a in argv)
    return (f"# Written by 'sparkrun setup ... --save-sudo': {purpose}.\n"
            f"# Allows exactly this command line, nothing else; delete this file to revoke it.\n"
            f"{user} ALL=(root) NOPASSWD: {command}\n")


def sudoers_file(user: str, purpose: str) -> str:
    """sudo skips names with a dot, so the user name is folded to letters, digits, - and _."""
    return f"{SUDOERS_DIR}/sparkrun-{purpose}-{re.sub(r'[^A-Za-z0-9_-]', '_', user)}"


SAVE_SUDO_SH = r'''
save_sudo() {  # save_sudo DEST RULE: check with visudo, then move into place with mode 0440
  local dest=$1 tmp new
  new="$(dirname "$dest")/.$(basename "$dest").new"  # sudo skips names with a dot
  tmp=$(mktemp) || return 1
  printf '%s' "$2" > "$tmp"
  if ! as_root visudo -cf "$tmp" >/dev/null; then rm -f "$tmp"; echo "@@sudo-invalid"; return 1; fi
  as_root install -m 0440 -o root -g root "$tmp" "$new" || { rm -f "$tmp"; return 1; }
  rm -f "$tmp"
  as_root mv -f "$new" "$dest" || return 1
  if ! as_root visudo -c >/dev/null 2>&1; then as_root rm -f "$dest"; echo "@@sudo-invalid"; return 1; fi
  echo "@@sudo-saved $dest"
}
'''


class SudoFacts(Record):
    """Who the ssh user is on a host, and the absolute paths of the commands a rule would name."""
    user: str
    group: str
    uid: int
    commands: dict  # name -> absolute path
    extra: dict  # what the caller's probe added (@@key value lines)
    allowed: bool  # sudo already runs the exact command without a password


def sudo_probe_script(commands: tuple, check_argv: str, extra: str = "") -> str:
    """Facts for SudoFacts. check_argv is the exact command (bash words, may use $user, $group and
    the probed paths) that `sudo -n -l` is asked about."""
    lookups = "".join(f'  {c}_bin=$(command -v {c} 2>/dev/null || echo /usr/bin/{c}); echo "@@cmd {c} ${c}_bin"\n'
                      for c in commands)
    return ("main() {\n  user=$(id -un); group=$(id -gn)\n"
            '  echo "@@user $user"; echo "@@group $group"; echo "@@uid $(id -u)"\n'
            + lookups + extra
            + f'  if [ "$(id -u)" != 0 ] && sudo -n -l -- {check_argv} >/dev/null 2>&1; then echo "@@allowed 1"; fi\n'
            + "}\nmain\n")


def parse_sudo_facts(host: str, output: str) -> SudoFacts:
    fields: dict = {}
    commands = {}
    for line in output.splitlines():
        if line.startswith("@@cmd "):
            _, name, path = line.split(" ", 2)
            commands[name] = path
        elif line.startswith("@@"):
            key, _, value = line[2:].partition(" ")
            fields[key] = value
    if "user" not in fields or not fields.get("uid", "").isdigit():
        raise RemoteFailed(host, f"the host did not answer sparkrun's probe: {output.strip()[-200:]}")
    extra = {k: v for k, v in fields.items() if k not in ("user", "group", "uid", "allowed")}
    return SudoFacts(fields["user"], fields.get("group", fields["user"]), int(fields["uid"]), commands, extra,
                     fields.get("allowed") == "1")


def probe_sudo(ssh: SSH, hosts: list[str], script_for) -> dict:
    results = ssh.run_all(hosts, script_for, timeout=120)
    facts = {}
    for host, result in results.items():
        if isinstance(result, HostError):
            facts[host] = result
        else:
            try:
                facts[host] = parse_sudo_facts(host, result.stdout)
            except HostError as exc:
                facts[host] = exc
    return facts


def save_sudo_lines(facts: SudoFacts, argv: list[str], purpose: str, text: str) -> str:
    """The script lines that install the rule for argv (nothing for root or when sudo already
    allows it without a password)."""
    if facts.uid == 0:
        return '  echo "@@sudo-root"\n'
    if facts.allowed:
        return '  echo "@@sudo-present"\n'
    rule = sudoers_rule(facts.user, argv, text)
    return f"  save_sudo {shlex.quote(sudoers_file(facts.user, purpose))} {shlex.quote(rule)} || exit 1\n"


def sudo_outcome(result: RemoteResult) -> str:
    out = result.stdout
    if "@@sudo-root" in out:
        return "root needs no sudo rule"
    if "@@sudo-present" in out:
        return "sudo already allows it without a password; no rule needed"
    saved = re.search(r"@@sudo-saved (\S+)", out)
    return f"sudo rule saved: {saved[1]}" if saved else ""


# -- fix-permissions -------------------------------------------------------------

def cache_dir_expr(cache_dir_option: str | None) -> str:
    """The hosts' HF cache as a bash expression ($HOME-relative unless absolute)."""
    root = remote_cache_root(cache_dir_option)
    root = root[2:] if root.startswith("~/") else root
    check_cli_value("--cache-dir", root)
    return quote_path(root)


def fix_permissions_probe(cache_expr: str) -> str:
    extra = (f"  dir={cache_expr}\n"
             '  if [ ! -d "$dir" ]; then echo "@@missing $dir"; return; fi\n'
             '  dir=$(cd "$dir" && pwd -P); echo "@@dir $dir"\n'
             '  [ -d "$dir/hub" ] && echo "@@hub 1"\n'
             '  foreign=$(find "$dir" \\( ! -user "$user" -o ! -group "$group" \\) -print 2>/dev/null | wc -l)\n'
             '  echo "@@foreign $foreign"\n')
    return sudo_probe_script(("chown",), '"$chown_bin" -hR "$user:$group" "$dir"', extra)


UNSAFE_CACHE_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
                     "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"}


def chown_argv(facts: SudoFacts) -> list[str]:
    folder = facts.extra["dir"]
    if folder in UNSAFE_CACHE_DIRS or folder.count("/") < 2 or "hub" not in facts.extra:
        raise UsageError(f"{folder} does not look like a Hugging Face cache (no hub/ folder inside); "
                         "refusing to chown it: pass the folder that holds hub/ with --cache-dir")
    return [facts.commands["chown"], "-hR", f"{facts.user}:{facts.group}", folder]


def cmd_setup_fix_permissions(args) -> int:
    selection = select_hosts(args)
    hosts = list(selection.hosts)
    ssh = SSH(selection.user, args.verbose)
    cache_expr = cache_dir_expr(args.cache_dir)
    facts = probe_sudo(ssh, hosts, fix_permissions_probe(cache_expr))
    raise_first(facts)
    scripts, plans = {}, {}
    for host, fact in facts.items():
        if "missing" in fact.extra:
            print(f"{host}: no cache at {fact.extra['missing']}; nothing to do")
            continue
        argv = chown_argv(fact)
        foreign = int(fact.extra.get("foreign", "0") or 0)
        body = f"  echo '@@chowned'\n  as_root {shlex.join(argv)} || exit 1\n" if foreign else ""
        if args.save_sudo:
            body += save_sudo_lines(fact, argv, "chown-cache",
                                    f"gives {fact.user} back the Hugging Face cache {argv[-1]}")
        plans[host] = (argv, foreign)
        if body:
            scripts[host] = root_script(body, SAVE_SUDO_SH)
        else:
            print(f"{host}: {argv[-1]} already belongs to {fact.user}:{fact.group}; nothing changed")
    if not scripts:
        return 0
    results = run_as_root(ssh, list(scripts), scripts.get, what="chown")
    for host, result in results.items():
        if isinstance(result, HostError):
            continue
        argv, foreign = plans[host]
        done = [f"{foreign} entries given back to {argv[2]}"] if foreign else []
        done += [s for s in [sudo_outcome(result)] if s]
        print(f"{host}: {argv[-1]}: {'; '.join(done)}")
    raise_first(results)
    return 0


# -- clear-cache -------------------------------------------------------------------



# Containers write the compile caches as root: what the user cannot remove goes as root. A folder
# that is a symbolic link is left alone: emptying it would empty whatever it points at.
EMPTY_COMPILE_CACHES_SH = """\
  if [ -L CACHES ]; then
    echo "@@compile-linked"
  elif [ -d CACHES ]; then
    kib=$(du -sk CACHES | cut -f1)
    rm -rf CACHES/* 2>/dev/null || as_root rm -rf -- CACHES/* || exit $?
    echo "@@compile-emptied $kib"
  fi
"""
COMPILE_CACHES_LINKED = ("{host}: ~/.cache/sparkrun/compile is a symbolic link; not emptied (empty the folder it "
                         "points at yourself)")


def cmd_setup_clear_cache(args) -> int:
    selection = select_hosts(args)
    hosts = list(selection.hosts)
    ssh = SSH(selection.user, args.verbose)
    target = drop_caches_target()
    extra = f"  echo \"@@target {target[1:-1]}\"\n"
    facts = probe_sudo(ssh, hosts, sudo_probe_script(("tee",), f'"$tee_bin" {target}', extra))
    raise_first(facts)
    scripts = {}
    for host, fact in facts.items():
        argv = [fact.commands["tee"], fact.extra["target"]]
        body = (EMPTY_COMPILE_CACHES_SH.replace("CACHES", remote_join([REMOTE_COMPILE_CACHE]))
                if args.compile_caches else "")
        body += ("  before=$(awk '/^Cached:/ {print $2}' /proc/meminfo)\n  sync\n"
                f"  printf '3\\n' | as_root {shlex.join(argv)} >/dev/null || exit $?\n"
                "  echo \"@@cached $before $(awk '/^Cached:/ {print $2}' /proc/meminfo)\"\n")
        if args.save_sudo:
            body += save_sudo_lines(fact, argv, "drop-caches", f"lets {fact.user} drop the page cache")
        scripts[host] = root_script(body, SAVE_SUDO_SH)
    results = run_as_root(ssh, hosts, scripts.get, what="dropping the page cache")
    for host, result in results.items():
        if isinstance(result, HostError):
            continue
        cached = re.search(r"@@cached (\d+) (\d+)", result.stdout)
        sizes = f" (page cache {int(cached[1]) / 2**20:.1f} -> {int(cached[2]) / 2**20:.1f} GiB)" if cached else ""
        extra = sudo_outcome(result)
        emptied = re.search(r"@@compile-emptied (\d+)", result.stdout)
        if emptied:
            print(f"{host}: emptied the compile caches ({int(emptied[1]) / 2**20:.2f} GB)")
        elif "@@compile-linked" in result.stdout:
            warn(COMPILE_CACHES_LINKED.format(host=host))
        print(f"{host}: synced and dropped the page cache{sizes}" + (f"; {extra}" if extra else ""))
    raise_first(results)
    return 0


# -- SSH mesh ---------------------------------------------------------------------
# Members: every host, plus this machine (run locally as "localhost") unless --no-include-self.
# 1. contact: each member gets ~/.ssh/id_ed25519 if it has none and reports its public key and
#    the addresses of the ssh connection; this machine's key is authorized at the same time (a
#    host that refuses our key gets a password prompt on the terminal, once).
# 2. mesh: each member appends the others' public keys to authorized_keys and learns the others'
#    host keys (ssh-keyscan from that member, written under every name used for it) when missing.
# 3. check: each member logs in to every host by address with BatchMode=yes.

THIS_MACHINE = "localhost"

MESH_CONTACT_SH = r'''
main() {
  umask 077
  key="$HOME/.ssh/id_ed25519"
  [ -d "$HOME/.ssh" ] || mkdir -p "$HOME/.ssh" || exit 1
  if [ ! -f "$key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C "$(id -un)@$(hostname)" -f "$key" </dev/null >/dev/null || exit 1
    echo "@@created"
  elif [ ! -f "$key.pub" ]; then
    ssh-keygen -y -P '' -f "$key" > "$key.pub" 2>/dev/null </dev/null || { echo "@@nopub"; rm -f "$key.pub"; exit 1; }
  fi
  echo "@@pub $(head -n 1 "$key.pub")"
  echo "@@conn $SSH_CONNECTION"
  added_keys=0
  AUTHORIZE
  echo "@@authorized $added_keys"
}
'''

MESH_FILES_SH = r'''
ak="$HOME/.ssh/authorized_keys"
kh="$HOME/.ssh/known_hosts"
newline_end() {  # before appending: ~/.ssh exists, and the file ends with a newline
  [ -d "${1%/*}" ] || mkdir -p "${1%/*}"
  [ -s "$1" ] && [ -n "$(tail -c 1 "$1")" ] && echo >> "$1"; return 0
}
authorize() {  # authorize PUBKEY: append it to authorized_keys unless its key is there
  local blob
  blob=$(printf '%s\n' "$1" | awk '{print $2}')
  [ -f "$ak" ] && grep -qF -- "$blob" "$ak" && return 0
  newline_end "$ak"; printf '%s\n' "$1" >> "$ak"; added_keys=$((added_keys + 1))
}
learn() {  # learn PORT ADDRESS NAME...: scan ADDRESS, record its keys under each NAME if missing
  local port=$1 address=$2 keys name entry found type blob
  shift 2
  keys=$(ssh-keyscan -T 5 -p "$port" -t rsa,ecdsa,ed25519 "$address" 2>/dev/null </dev/null | grep -v '^#')
  if [ -z "$keys" ]; then echo "@@noscan $address"; return 0; fi
  while read -r _ type blob _; do
    [ -n "$blob" ] || continue
    for name in "$@"; do
      entry=$name; [ "$port" = 22 ] || entry="[$name]:$port"
      found=$(ssh-keygen -F "$entry" -f "$kh" 2>/dev/null | grep -v '^#')
      printf '%s\n' "$found" | grep -qF -- "$blob" && continue
      if printf '%s\n' "$found" | awk -v t="$type" '$2 == t || $3 == t {f = 1} END {exit !f}'; then
        echo "@@conflict $entry $type"; continue
      fi
      newline_end "$kh"; printf '%s %s %s\n' "$entry" "$type" "$blob" >> "$kh"; added_hosts=$((added_hosts + 1))
    done
  done <<< "$keys"
}
'''


class MeshMember(Record):
    name: str  # as given, or THIS_MACHINE
    pubkey: str
    created: bool
    authorized: int  # this machine's key, authorized during contact
    address: str = ""  # the host's address on the connection from here (SSH_CONNECTION)
    port: int = 22
    peer: str = ""  # this machine's address as the host sees it
    login: str | None = None  # user for logging in to it, when not the default

    @property
    def local(self) -> bool:
        return self.name in LOCAL_HOSTS

    def names(self) -> list[str]:
        """Names its host key is recorded under: its address, and the name given if different."""
        given = self.name.rpartition("@")[2].strip("[]")
        return list(dict.fromkeys([self.address, given]))


def mesh_contact_script(authorize: list[str]) -> str:
    lines = "".join(f"  authorize {shlex.quote(k)}\n" for k in authorize)
    return MESH_FILES_SH + MESH_CONTACT_SH.replace("  AUTHORIZE\n", lines) + "main\n"


def parse_contact(host: str, output: str, login: str | None) -> MeshMember:
    values = {}
    for line in output.splitlines():
        if line.startswith("@@"):
            key, _, value = line[2:].partition(" ")
            values[key] = value.strip()
    pubkey = values.get("pub", "")
    if not PUBKEY_RE.fullmatch(pubkey):
        raise RemoteFailed(host, f"could not read or create ~/.ssh/id_ed25519.pub: {output.strip()[-200:]}")
    conn = values.get("conn", "").split()
    member = MeshMember(host, pubkey, "created" in values, int(values.get("authorized") or 0), login=login)
    if host in LOCAL_HOSTS:
        return member  # run here, not over ssh: a SSH_CONNECTION would be the user's own session
    if len(conn) == 4 and conn[3].isdigit():
        return member.replace(address=conn[2], port=int(conn[3]), peer=conn[0])
    return member.replace(address=host.rpartition("@")[2])


def mesh_script(member: MeshMember, members: list[MeshMember]) -> str:
    """Authorize every other member's key and learn every other member's host key."""
    lines = []
    for other in members:
        if other.pubkey != member.pubkey:
            lines.append(f"  authorize {shlex.quote(other.pubkey)}\n")
    for other in members:
        if other is member or other.pubkey == member.pubkey:
            continue
        if other.local:  # this machine, as this host sees it (it may run no ssh server)
            if member.peer:
                lines.append(f"  learn 22 {shlex.quote(member.peer)} {shlex.quote(member.peer)}\n")
            continue
        names = " ".join(shlex.quote(n) for n in other.names())
        lines.append(f"  learn {other.port} {shlex.quote(other.address)} {names}\n")
    body = "main() {\n  umask 077\n  added_keys=0; added_hosts=0\n" + "".join(lines) + \
           '  echo "@@added $added_keys $added_hosts"\n}\n'
    return MESH_FILES_SH + body + "main\n"


def mesh_check_script(targets: list[MeshMember]) -> str:
    """Log in to each target with this member's own key and known_hosts, never prompting."""
    lines = []
    for t in targets:
        login = f"-l {shlex.quote(t.login)} " if t.login else ""
        lines.append(f"  check {login}-p {t.port} {shlex.quote(t.address)}\n")
    return ("check() {\n"
            '  local out; out=$(ssh -n -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=yes '
            '-o UpdateHostKeys=no -o ControlMaster=no -o ControlPath=none -o IdentitiesOnly=yes '
            '-i "$HOME/.ssh/id_ed25519" -o UserKnownHostsFile="$HOME/.ssh/known_hosts" "$@" true 2>&1) '
            '&& echo "@@ok ${@: -1}" || echo "@@fail ${@: -1} $(printf "%s" "$out" | tail -n 1)"\n}\n'
            "main() {\n" + "".join(lines) + "  :\n}\nmain\n")


class PromptingSSH(SSH):
    """The same ssh, allowed to ask for a password on the user's terminal (first contact only).
    ssh takes the first value of an option, so BatchMode=no goes first."""

    def argv(self, host: str, remote: list[str], *, stream: bool = False) -> list[str]:
        argv = super().argv(host, remote, stream=stream)
        return [argv[0], "-o", "BatchMode=no", *argv[1:]]


def mesh_hosts(args, selection: HostSelection) -> list[str]:
    hosts = list(selection.hosts)
    for extra in parse_host_list(args.extra_hosts or ""):
        if extra not in hosts:
            hosts.append(extra)
    return hosts


def cmd_setup_ssh(args) -> int:
    selection = select_hosts(args)
    hosts = mesh_hosts(args, selection)
    ssh = SSH(selection.user, args.verbose)
    include_self = not args.no_include_self and THIS_MACHINE not in hosts
    members: dict[str, MeshMember] = {}
    if include_self:
        result = ssh.run(THIS_MACHINE, mesh_contact_script([]), check=True, what="creating this machine's key")
        members[THIS_MACHINE] = parse_contact(THIS_MACHINE, result.stdout, None)
    authorize = [members[THIS_MACHINE].pubkey] if include_self else []
    contact = mesh_contact_script(authorize)
    say(f"Contacting {len(hosts)} hosts ...")
    results = ssh.run_all(hosts, contact, timeout=60)
    refused = [h for h, r in results.items() if isinstance(r, (AuthRefused, HostKeyMismatch))]
    if refused and sys.stdin.isatty():
        prompting = PromptingSSH(selection.user, args.verbose)
        for host in refused:  # one at a time: each may ask for a password
            say(f"{host}: first contact; ssh may ask to confirm the host key and for the password, once")
            try:
                results[host] = prompting.run(host, contact, timeout=300)
            except HostError as exc:
                results[host] = exc
    for host, result in results.items():
        if isinstance(result, AuthRefused):
            results[host] = AuthRefused(host, "ssh refused our key; run 'sparkrun setup ssh' on a terminal to type "
                                              "the password once, or install a key first (ssh-copy-id)")
        elif isinstance(result, RemoteResult) and not result.ok:
            results[host] = RemoteFailed(host, f"setting up ~/.ssh failed (exit {result.returncode}): "
                                               f"{result.stderr_tail() or result.stdout.strip()[-200:]}")
    raise_first(results)
    for host, result in results.items():
        login = host.partition("@")[0] if "@" in host else selection.user
        members[host] = parse_contact(host, result.stdout, login)
    everyone = list(members.values())

    mesh = ssh.run_all(list(members), lambda name: mesh_script(members[name], everyone), timeout=300)
    for name, result in mesh.items():
        if isinstance(result, RemoteResult) and not result.ok:
            mesh[name] = RemoteFailed(name, f"updating ~/.ssh failed: {result.stderr_tail()}")
    raise_first(mesh)

    changed = False
    for name, member in members.items():
        out = mesh[name].stdout
        added = re.search(r"@@added (\d+) (\d+)", out)
        keys, known = (int(added[1]), int(added[2])) if added else (0, 0)
        keys += member.authorized
        notes = (["key created"] if member.created else []) + \
                ([f"+{keys} authorized key{'s' * (keys != 1)}"] if keys else []) + \
                ([f"+{known} known_hosts entr{'ies' if known != 1 else 'y'}"] if known else [])
        changed = changed or bool(notes)
        label = "this machine" if member.local else name
        print(f"{label:<24} {', '.join(notes) or 'unchanged'}")
        for entry, key_type in re.findall(r"@@conflict (\S+) (\S+)", out):
            warn(f"{label}: known_hosts already has a different {key_type} key for {entry}; left alone "
                 f"(if that host was reinstalled: ssh-keygen -R {entry})")
        for address in re.findall(r"@@noscan (\S+)", out):
            if member.peer and address == member.peer:
                say(f"{label}: no ssh server answers at this machine's address {address} "
                    "(hosts cannot log in here; sparkrun does not need them to)")
            else:
                warn(f"{label}: no ssh server answered at {address}")

    remote = [m for m in everyone if not m.local]
    checks = ssh.run_all(list(members), lambda name: mesh_check_script(
        [m for m in remote if m is not members[name]]), timeout=120)
    failures = []
    for name, result in checks.items():
        label = "this machine" if members[name].local else name
        if isinstance(result, HostError):
            failures.append(str(result))
            continue
        failures += [f"{label} -> {t}: {why.strip() or 'refused'}"
                     for t, why in re.findall(r"@@fail (\S+) ?(.*)", result.stdout)]
    if failures:
        for failure in failures[:-1]:
            print(f"Error: {failure}", file=sys.stderr)
        raise SparkrunError(f"{failures[-1]} (the mesh is incomplete; fix it and run 'sparkrun setup ssh' again)")
    print(MESH_DONE if changed else MESH_UNCHANGED)
    return 0


# -- CX7 networking -----------------------------------------------------------------

class Cx7Port(Record):
    name: str
    pci: str
    state: str
    mtu: int
    carrier: bool
    addresses: tuple = ()  # address/prefix
    mac: str = ""
    neighbours: tuple = ()  # MACs that answered an all-nodes ping on this port's link


class Cx7Host(Record):
    host: str
    address: str  # the address this machine reaches it at (SSH_CONNECTION)
    port: int  # its ssh port
    ports: tuple  # Cx7Port, sorted by PCI address
    netplan_files: tuple = ()  # other netplan files naming a CX7 port

    @property
    def chosen(self) -> list[Cx7Port]:
        """The two ports to configure: the ones with a link when any has one."""
        linked = [p for p in self.ports if p.carrier]
        return (linked or list(self.ports))[:2]


CX7_PROBE_SH = r'''
main() {
  sysfs=${SPARKRUN_SYSFS:-/sys}
  netplan_dir=${SPARKRUN_NETPLAN_DIR:-/etc/netplan}
  echo "@@conn $SSH_CONNECTION"
  names=
  for d in "$sysfs"/class/net/*; do
    [ "$(cat "$d/device/vendor" 2>/dev/null)" = MELLANOX ] || continue
    n=${d##*/}; names="$names $n"
    pci=$(basename "$(readlink -f "$d/device")")
    state=$(cat "$d/operstate" 2>/dev/null || echo unknown)
    carrier=$(cat "$d/carrier" 2>/dev/null || echo 0)
    echo "@@port $n $pci $state $(cat "$d/mtu" 2>/dev/null || echo 0) $carrier"
    echo "@@mac $n $(cat "$d/address" 2>/dev/null)"
    # Who is at the other end: every node on the link answers an IPv6 all-nodes ping from its
    # link-local address, which carries its MAC.
    [ "$carrier" = 1 ] && (ping -6 -n -c 2 -w 2 "ff02::1%$n" 2>/dev/null | while read -r line; do
      echo "@@ping $n $line"; done) &
  done
  wait
  ip -o -4 addr show 2>/dev/null | awk '{print "@@addr", $2, $4}'
  for f in "$netplan_dir"/*.yaml; do
    [ -f "$f" ] && [ "${f##*/}" != NETPLAN_FILE ] || continue
    for n in $names; do grep -qw -- "$n" "$f" 2>/dev/null && { echo "@@netplan $f"; break; }; done
  done
}
main
'''


def parse_cx7(host: str, output: str) -> Cx7Host:
    ports, addrs, files, address, ssh_port = [], {}, [], host.rpartition("@")[2], 22
    macs, neighbours = {}, {}
    for line in output.splitlines():
        words = line.split()
        if line.startswith("@@conn ") and len(words) == 5:
            address, ssh_port = words[3], int(words[4]) if words[4].isdigit() else 22
        elif line.startswith("@@port ") and len(words) == 6:
            ports.append((words[1], words[2], words[3], int(words[4]) if words[4].isdigit() else 0, words[5] == "1"))
        elif line.startswith("@@addr ") and len(words) == 3:
            addrs.setdefault(words[1], []).append(words[2])
        elif line.startswith("@@mac ") and len(words) == 3:
            macs[words[1]] = words[2].lower()
        elif line.startswith("@@ping ") and len(words) > 2:
            # iputils ping: "64 bytes from fe80::4ebb:47ff:fe1e:101%enp1s0f0np0: icmp_seq=1 ttl=64 time=0.05 ms"
            found = re.search(r" from (fe80:[0-9a-f:]+)", line)
            mac = found and link_local_mac(found[1])
            if mac and mac not in neighbours.setdefault(words[1], []):
                neighbours[words[1]].append(mac)
        elif line.startswith("@@netplan "):
            files.append(line.split(" ", 1)[1])
    cx7 = sorted((Cx7Port(n, pci, state, mtu, carrier, tuple(addrs.get(n, ())), macs.get(n, ""),
                          tuple(neighbours.get(n, ())))
                  for n, pci, state, mtu, carrier in ports), key=lambda p: p.pci)
    return Cx7Host(host, address, ssh_port, tuple(cx7), tuple(files))


def link_local_mac(address: str) -> str:
    """The MAC inside an IPv6 link-local address made from it (EUI-64), or ""."""
    import ipaddress

    try:
        iid = ipaddress.IPv6Address(address.split("%")[0]).packed[8:]
    except ValueError:
        return ""
    if iid[3:5] != b"\xff\xfe":
        return ""
    return ":".join(f"{b:02x}" for b in (iid[0] ^ 2, iid[1], iid[2], iid[5], iid[6], iid[7]))


def cx7_links(hosts: list[Cx7Host]) -> list[list[tuple[Cx7Host, Cx7Port]]] | None:
    """The links the ports are cabled into, as found by the all-nodes pings: each a list of
    (host, port) with one port per host (the first, by PCI address, of the ports on that link:
    a CX7 port's twins share its cable). None when no port heard another host."""
    owner = {p.mac: (h, p) for h in hosts for p in h.ports if p.mac}
    groups: list[list[tuple[Cx7Host, Cx7Port]]] = []
    seen = set()
    for h in hosts:
        for port in h.ports:
            if port.mac in seen or not port.carrier:
                continue
            members = [(h, port)] + [owner[m] for m in port.neighbours if m in owner and m != port.mac]
            seen.update(p.mac for _, p in members)
            link, taken = [], set()
            for member_host, member_port in sorted(members, key=lambda m: (hosts.index(m[0]), m[1].pci)):
                if member_host.host not in taken:
                    taken.add(member_host.host)
                    link.append((member_host, member_port))
            if len(link) > 1:
                groups.append(link)
    return groups or None


def link_subnets(subnets: list, count: int) -> list:
    """`count` /24 subnets: the two given, then the ones following the second."""
    import ipaddress

    extra = [ipaddress.ip_network((int(subnets[1].network_address) + 256 * i, 24)) for i in range(1, count - 1)]
    return (list(subnets) + extra)[:count]


def link_assignments(hosts: list[Cx7Host], links: list, subnets: list, octets: dict) -> dict:
    """One subnet per link (a ring of direct cables, a crossed cable, or a switch per port)."""
    assigned: dict = {h.host: [] for h in hosts}
    for link, net in zip(links, link_subnets(subnets, len(links))):
        for h, port in link:
            assigned[h.host].append((port, f"{net.network_address + octets[h.host]}/24"))
    return {host: sorted(pairs, key=lambda pair: pair[0].pci) for host, pairs in assigned.items()}


def existing_links(links: list, mtu: int) -> list | None:
    """The subnets already in use when every port of every link holds one address, all of a link
    in one subnet, a different subnet per link, with the MTU."""
    import ipaddress

    subnets = []
    for link in links:
        if any(len(p.addresses) != 1 or p.mtu != mtu for _, p in link):
            return None
        nets = {ipaddress.ip_interface(p.addresses[0]).network for _, p in link}
        if len(nets) != 1:
            return None
        subnets.append(nets.pop())
    return subnets if len(set(subnets)) == len(subnets) else None


def check_subnet(text: str, option: str):
    import ipaddress

    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a subnet like 192.168.100.0/24") from None
    if net.version != 4 or net.prefixlen != 24:
        raise UsageError(f"{option}: {text} must be an IPv4 /24 (each host takes its own last octet)")
    return net


def host_octets(hosts: list[Cx7Host]) -> dict[str, int]:
    """Each host's last octet: that of its address when these are IPv4 and distinct, else 1..N."""
    import ipaddress

    octets = {}
    for h in hosts:
        try:
            ip = ipaddress.ip_address(h.address)
            octets[h.host] = int(str(ip).rsplit(".", 1)[1]) if ip.version == 4 else None
        except ValueError:
            octets[h.host] = None
    values = list(octets.values())
    if None in values or len(set(values)) != len(values) or not all(1 <= v <= 254 for v in values):
        say("hosts' addresses do not give distinct last octets; numbering them 1..N in the order given")
        return {h.host: i for i, h in enumerate(hosts, start=1)}
    return octets


def cx7_assignments(hosts: list[Cx7Host], subnets: list, octets: dict) -> dict[str, list[tuple[Cx7Port, str]]]:
    return {h.host: [(port, f"{net.network_address + octets[h.host]}/24") for port, net in zip(h.chosen, subnets)]
            for h in hosts}


def existing_cx7(hosts: list[Cx7Host], mtu: int) -> list | None:
    """The subnets already in use when every host's chosen ports are consistently configured
    (one address each, port k of every host in subnet k, distinct subnets and addresses, the MTU)."""
    import ipaddress

    subnets: list = []
    seen = set()
    for h in hosts:
        for k, port in enumerate(h.chosen):
            if len(port.addresses) != 1 or port.mtu != mtu:
                return None
            iface = ipaddress.ip_interface(port.addresses[0])
            if len(subnets) <= k:
                subnets.append(iface.network)
            if iface.network != subnets[k] or iface.ip in seen:
                return None
            seen.add(iface.ip)
    return subnets if len(set(subnets)) == len(subnets) and subnets else None


def netplan_text(assigned: list[tuple[Cx7Port, str]], mtu: int) -> str:
    lines = ["# Written by 'sparkrun setup cx7': the ConnectX-7 ports on the cluster subnets.",
             "network:", "  version: 2", "  ethernets:"]
    for port, address in assigned:
        lines += [f"    {port.name}:", "      dhcp4: false", "      dhcp6: false",
                  f"      addresses: [{address}]", f"      mtu: {mtu}"]
    return "\n".join(lines) + "\n"


def cx7_changes(hosts: list[Cx7Host], assigned: dict, mtu: int) -> dict[str, str]:
    """The netplan file of each host whose ports differ from their assignment. A host reached
    through a port whose address would change is refused: applying would cut this connection."""
    todo = {}
    for h in hosts:
        wanted = assigned[h.host]
        if all(p.addresses == (a,) and p.mtu == mtu for p, a in wanted):
            continue
        for port, address in wanted:
            if h.address in {x.split("/")[0] for x in port.addresses} and h.address != address.split("/")[0]:
                raise UsageError(f"{h.host}: this machine reaches it through {port.name}, whose address would "
                                 "change and cut the connection; run again with the hosts' management addresses")
        todo[h.host] = netplan_text(wanted, mtu)
    return todo


def cx7_apply_script(text: str) -> str:
    body = f"""\
  dir=${{SPARKRUN_NETPLAN_DIR:-/etc/netplan}}
  dest="$dir/{NETPLAN_FILE}"
  tmp=$(mktemp) || exit 1
  cat > "$tmp" <<'SPARKRUN_NETPLAN'
{text}SPARKRUN_NETPLAN
  had=0
  if [ -e "$dest" ]; then had=1; as_root cp -p "$dest" "$dest.prev" || exit 1; fi
  restore() {{ if [ $had = 1 ]; then as_root mv -f "$dest.prev" "$dest"; else as_root rm -f "$dest"; fi; }}
  as_root install -m 0600 "$tmp" "$dest.new" && as_root mv -f "$dest.new" "$dest" || {{ rm -f "$tmp"; exit 1; }}
  rm -f "$tmp"
  if ! as_root netplan generate; then restore; echo "@@invalid"; exit 3; fi
  if ! as_root netplan apply; then restore; as_root netplan apply; echo "@@apply-failed"; exit 4; fi
  [ $had = 0 ] || as_root rm -f "$dest.prev"
  echo "@@applied $dest"
"""
    return root_script(body)


def confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def learn_names_script(targets: list[tuple[int, str, list[str]]]) -> str:
    lines = "".join(f"  learn {port} {shlex.quote(address)} {' '.join(shlex.quote(n) for n in names)}\n"
                    for port, address, names in targets)
    return (MESH_FILES_SH + "main() {\n  umask 077\n  added_hosts=0\n" + lines
            + '  echo "@@added 0 $added_hosts"\n}\nmain\n')


def learn_cx7_addresses(ssh: SSH, hosts: list[Cx7Host], assigned: dict) -> None:
    """Every host and this machine record each host's key under its CX7 addresses, scanned at
    the address used to reach it (the CX7 links need not be up yet)."""
    targets = {h.host: (h.port, h.address, [a.split("/")[0] for _, a in assigned[h.host]]) for h in hosts}
    members = [THIS_MACHINE] + [h.host for h in hosts]
    results = ssh.run_all(members, lambda name: learn_names_script(
        [target for host, target in targets.items() if host != name]), timeout=120)
    for name, result in results.items():
        label = "this machine" if name == THIS_MACHINE else name
        if isinstance(result, HostError) or not result.ok:
            why = result if isinstance(result, HostError) else result.stderr_tail()
            warn(f"{label}: could not update known_hosts: {why}")
            continue
        added = re.search(r"@@added \d+ (\d+)", result.stdout)
        count = int(added[1]) if added else 0
        print(f"{label}: known_hosts " + (f"+{count} CX7 address entries" if count
                                          else "already knows the CX7 addresses"))


def show_cx7(hosts: list[Cx7Host]) -> None:
    rows = [[h.host, p.name, p.state + ("" if p.carrier else " (no link)"), str(p.mtu), ", ".join(p.addresses) or "-"]
            for h in hosts for p in h.ports]
    print_table(rows, ["HOST", "PORT", "STATE", "MTU", "ADDRESSES"])


def cmd_setup_cx7(args) -> int:
    selection = select_hosts(args)
    hosts = list(selection.hosts)
    if args.mtu < 1280 or args.mtu > 9216:
        raise UsageError("--mtu must be between 1280 and 9216")
    if bool(args.subnet1) != bool(args.subnet2):
        raise UsageError("--subnet1 and --subnet2 go together")
    subnets = [check_subnet(args.subnet1 or CX7_SUBNETS[0], "--subnet1"),
               check_subnet(args.subnet2 or CX7_SUBNETS[1], "--subnet2")]
    if subnets[0] == subnets[1]:
        raise UsageError("--subnet1 and --subnet2 must differ")
    ssh = SSH(selection.user, args.verbose)
    probe = CX7_PROBE_SH.replace("MELLANOX", MELLANOX_VENDOR).replace("NETPLAN_FILE", NETPLAN_FILE)
    results = ssh.run_all(hosts, probe, timeout=60)
    raise_first(results)
    found = [parse_cx7(h, results[h].stdout) for h in hosts]
    missing = [h.host for h in found if not h.ports]
    if missing:
        raise UsageError(f"no ConnectX-7 ports (PCI vendor {MELLANOX_VENDOR}) found on {', '.join(missing)}")
    show_cx7(found)
    links = cx7_links(found)
    if links:
        print("\nCabling: " + "; ".join(" - ".join(f"{h.host} {p.name}" for h, p in link) for link in links))
    existing = existing_links(links, args.mtu) if links else existing_cx7(found, args.mtu)
    if existing and not args.force:
        nets = ", ".join(str(n) for n in existing)
        print(f"\nCX7 networking is already configured ({nets}, MTU {args.mtu}); kept (--force replaces it).")
        ports = {h.host: [p for link in links for lh, p in link if lh is h] for h in found} if links else \
            {h.host: h.chosen for h in found}
        assigned = {h.host: [(p, p.addresses[0]) for p in ports[h.host]] for h in found}
        if not args.dry_run:
            learn_cx7_addresses(ssh, found, assigned)
        return 0
    octets = host_octets(found)
    assigned = link_assignments(found, links, subnets, octets) if links else cx7_assignments(found, subnets, octets)
    todo = cx7_changes(found, assigned, args.mtu)
    for h in found:
        if h.host not in todo:
            shown = ", ".join(f"{p.name} {a}" for p, a in assigned[h.host])
            print(f"\n{h.host}: already matches ({shown}); unchanged")
            continue
        print(f"\n{h.host}: /etc/netplan/{NETPLAN_FILE}")
        print(todo[h.host].rstrip())
        for other in h.netplan_files:
            warn(f"{h.host}: {other} also names a CX7 port; {NETPLAN_FILE} is read after it and wins")
    if args.dry_run or not todo:
        if not todo and not args.dry_run:
            learn_cx7_addresses(ssh, found, assigned)
        return 0
    if not args.yes and not confirm(f"\nWrite and apply this on {len(todo)} host{'s' * (len(todo) != 1)}?"):
        raise UsageError(NOT_CONFIRMED)
    applied = run_as_root(ssh, list(todo), lambda host: cx7_apply_script(todo[host]), what="netplan")
    for host, result in applied.items():
        if isinstance(result, RemoteResult):
            print(f"{host}: netplan applied")
    raise_first(applied)
    learn_cx7_addresses(ssh, found, assigned)
    return 0


# -- the parsers ----------------------------------------------------------------------

def add_parsers(sub, command, host_options) -> None:
    setup = sub.add_parser("setup", help=COMMAND_HELP["setup"], description=COMMAND_HELP["setup"])
    add_common(setup)
    ssub = setup.add_subparsers(dest="setup_command", metavar="SUBCOMMAND", required=True)
    p = command("install", cmd_setup_install, "Install sparkrun for this user (uv tool, or the .pyz copied to "
                                              "~/.local/bin), then shell completion.", ssub)
    p.add_argument("--no-completion", action="store_true", help="do not set up shell completion")
    p = command("completion", cmd_setup_completion, "Install shell completion (commands, options, recipe, "
                                                    "cluster and registry names).", ssub)
    p.add_argument("--shell", choices=SHELLS, help="default: from $SHELL")
    p.add_argument("--print", action="store_true", help="print the script instead of installing it")
    p = command("update", cmd_setup_update, "Upgrade sparkrun the way it was installed, then the registries.", ssub)
    p.add_argument("--no-update-registries", action="store_true", help="only upgrade sparkrun")
    p = command("ssh", cmd_setup_ssh, "Full SSH mesh: keys, authorized_keys and known_hosts on every host "
                                      "(and this machine); adds only what is missing.", ssub)
    host_options(p, solo=False)
    p.add_argument("--extra-hosts", metavar="H,...", help="more hosts to join the mesh")
    p.add_argument("--no-include-self", action="store_true", help="leave this machine out of the mesh")
    p = command("cx7", cmd_setup_cx7, "Show the ConnectX-7 ports and put them on two /24 subnets with netplan.", ssub)
    host_options(p, solo=False)
    p.add_argument("--subnet1", metavar="CIDR", help=f"first port's /24 (default {CX7_SUBNETS[0]})")
    p.add_argument("--subnet2", metavar="CIDR", help=f"second port's /24 (default {CX7_SUBNETS[1]})")
    p.add_argument("--mtu", type=int, default=9000, help="MTU of the ports (default 9000)")
    p.add_argument("--force", action="store_true", help="replace a valid existing configuration")
    p.add_argument("-n", "--dry-run", action="store_true", help="print each host's netplan file; change nothing")
    p.add_argument("-y", "--yes", action="store_true", help="apply without asking")
    p = command("fix-permissions", cmd_setup_fix_permissions, "Give the ssh user back the Hugging Face cache on "
                                                              "each host (files containers wrote as root).", ssub)
    host_options(p, solo=False)
    p.add_argument("--cache-dir", help="the hosts' cache (default ~/.cache/huggingface)")
    p.add_argument("--save-sudo", action="store_true", help="install a sudoers rule allowing exactly this chown")
    p = command("clear-cache", cmd_setup_clear_cache, "sync and drop the page cache on each host.", ssub)
    host_options(p, solo=False)
    p.add_argument("--save-sudo", action="store_true",
                   help="install a sudoers rule allowing exactly this write to /proc/sys/vm/drop_caches")
    p.add_argument("--compile-caches", action="store_true",
                   help="also empty the engines' compile caches (~/.cache/sparkrun/compile) on each host")
