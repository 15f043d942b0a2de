"""Hostile recipes and registries, careless input, concurrency: every class of bad input is tried
with generated names, values and files, and must end in a one-line error (exit 2) or be handled,
never run a command, read a file it must not, or lose data.

Nothing here leaves 127.0.0.0/8: registries are local git repositories."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import sparkrun as sr
from conftest import H1, H2, REPO
from test_lifecycle import IMAGES, lab, popen, wait_for_line  # noqa: F401 - lab is a fixture used below
from test_registry import GIT, commit, make_repo, one_error_line

lab_setup = sr.command_module("lab_setup")

RECIPE = "model: org/m\ncontainer: img:1\nruntime: vllm\ncommand: vllm serve {model} --port {port}\n"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def write(folder: Path, name: str, text) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def yaml_quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


# -- env keys and values: validated once, quoted once ------------------------------------------

BAD_ENV_KEYS = ["A\nB", "A\ntouch /tmp/pwned #", "A=B", "=A", "A B", "1ABC", "", "A-B", "A.B", "A;id",
                "$(id)", "`id`", "A'B", 'A"B', "A\tB", "A\x1b[2J", "ÄKEY", "A\\B", "-e", "A\rB", "A/B", "A:B"]


@pytest.mark.parametrize("key", BAD_ENV_KEYS, ids=[f"key{i}" for i in range(len(BAD_ENV_KEYS))])
def test_env_keys_outside_the_name_rule_are_refused(tmp_path, key):
    path = write(tmp_path, "r.yaml", RECIPE + f"env: {{{yaml_quote(key)}: x}}\n")
    with pytest.raises(sr.RecipeError, match="field 'env'"):
        sr.load_recipe(path)


HOSTILE_VALUES = ["$(touch PWNED)", "`touch PWNED`", "'; touch PWNED; '", "\"; touch PWNED; \"", "a b  c",
                  "SPARKRUN_SECRETS", "EOF", "x\\", "\\$(touch PWNED)", "$HOME", "!!", "a|b&c>d<e",
                  "-e X=1", "--privileged", "ünïcødé ✓", "x" * 5000, "", " lead", "trail ", "#comment", "a=b=c",
                  "*", "~/.ssh", "start; exit", "\t"]


def fake_docker(folder: Path) -> Path:
    """A `docker` on PATH that records its argv and the content of its --env-file."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "docker"
    tool.write_text(f"#!{sys.executable}\nimport json, sys\nargv = sys.argv[1:]\n"
                    "files = [open(argv[i + 1]).read() for i, a in enumerate(argv) if a == '--env-file']\n"
                    f"json.dump({{'argv': argv, 'files': files}}, open({str(folder / 'call.json')!r}, 'w'))\n")
    tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("secret", [False, True], ids=["plain", "secret"])
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=[f"value{i}" for i in range(len(HOSTILE_VALUES))])
def test_env_values_reach_docker_exactly_and_run_nothing(tmp_path, value, secret):
    """The generated start script, run by bash as ssh would run it, hands docker every value
    verbatim (argv or --env-file) and runs nothing of it."""
    key = "MY_TOKEN" if secret else "PLAIN"
    recipe = sr.Recipe("r", tmp_path / "r.yaml", "Local", model="org/m", container="img:1", command="serve",
                       env={key: value})
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1",), None, "t"), sr.LaunchOptions(overrides={}),
                          environ={})
    spec = plan.containers[0]
    script, data = sr.start_container_script(spec)
    env = dict(os.environ, PATH=f"{fake_docker(tmp_path)}:{os.environ['PATH']}", HOME=str(tmp_path))
    done = subprocess.run(["bash", "-s"], input=script.encode() + data, cwd=tmp_path, env=env,
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    call = json.loads((tmp_path / "call.json").read_text())
    env_file = call["argv"][call["argv"].index("--env-file") + 1] if secret else None
    home = lambda arg: f"{tmp_path}/{arg[2:]}" if arg.startswith("~/") else arg  # noqa: E731 - "~/" is the remote home
    assert call["argv"] == [home(a) for a in spec.docker_run_argv(env_file)[1:]]
    if secret:
        assert call["files"] == [f"{key}={value}\n"] and f"{key}={value}" not in script
        assert "secret MY_TOKEN=***" in plan.describe()
    else:
        assert f"{key}={value}" in call["argv"]
    assert not list(tmp_path.rglob("PWNED"))


# -- model_revision: a branch, tag or commit, and quoted ----------------------------------------

BAD_REVISIONS = ["$(touch PWNED)", "`id`", "../..", "../../../etc", "/etc/passwd", "a/../../b", "main;id", "a b",
                 "-rf", ".hidden", "a..b", "x.lock", "x/", "//x", "a//b", "main\n", "ü", "x'y", "~", "x" * 300,
                 "refs/../x", "a/./b", "$HOME", "*", "a:b"]
GOOD_REVISIONS = ["main", "v1.0.2", "refs/pr/1", "release/2.0", "my_branch-1", "0" * 40, "a1b2c3d"]


@pytest.mark.parametrize("revision", BAD_REVISIONS, ids=[f"rev{i}" for i in range(len(BAD_REVISIONS))])
def test_bad_model_revisions_are_refused(tmp_path, revision):
    path = write(tmp_path, "r.yaml", RECIPE + f"model_revision: {yaml_quote(revision)}\n")
    with pytest.raises(sr.RecipeError, match="field 'model_revision'"):
        sr.load_recipe(path)
    (tmp_path / "hf" / "hub" / "models--org--m" / "snapshots").mkdir(parents=True)  # '../..' would find a folder
    assert sr.cached_snapshot_dir(tmp_path / "hf", "org/m", revision) is None


@pytest.mark.parametrize("revision", GOOD_REVISIONS)
def test_good_revisions_load_and_the_snapshot_check_is_quoted(tmp_path, revision):
    recipe = sr.load_recipe(write(tmp_path, "r.yaml", RECIPE + f"model_revision: {yaml_quote(revision)}\n"))
    assert recipe.model_revision == revision
    # The names that reach the remote script are quoted there, whatever they hold.
    hostile = sr.RepoNeed("o/m;touch PWNED", "model", f"{revision}$(touch PWNED)")
    script = sr.survey_script([(hostile, "`touch PWNED`")], ".cache/huggingface")
    done = subprocess.run(["bash", "-s"], input=script, text=True, cwd=tmp_path, env=dict(os.environ, HOME=str(tmp_path)),
                          capture_output=True, timeout=30)
    assert done.returncode == 0 and not list(tmp_path.rglob("PWNED")), done.stderr
    assert "@@repo models--o--m;touch PWNED" in done.stdout


# -- registry clones: nothing read resolves outside; printed text has no control characters ----

@pytest.fixture
def outside(tmp_path):
    """Files on this machine a hostile registry would like to read."""
    folder = tmp_path / "outside"
    write(folder, "stolen.yaml", RECIPE.replace("org/m", "stolen/SECRET-RECIPE"))
    write(folder, "stolen-profile.yaml", "framework: llama-benchy\nmetadata: {description: SECRET-PROFILE}\n")
    write(folder, "stolen.json", '{"SECRET": "TUNING"}\n')
    write(folder, "manifest.yaml", "registries:\n  - name: stolen\n    recipes: recipes\n")
    write(folder, "mods/evil/run.sh", "echo SECRET-MOD\n")
    return folder


SYMLINKS = {  # path in the repository -> target (relative to the outside folder, or a path in it)
    "recipes/abs.yaml": "stolen.yaml",
    "recipes/rel.yaml": "../../outside/stolen.yaml",
    "recipes/linkdir": ".",
    "bench/abs.yaml": "stolen-profile.yaml",
    "tuning/vllm/abs.json": "stolen.json",
    "tuning/vllm/linkdir": ".",
    "mods/evil": "mods/evil",
}


def hostile_repo(tmp_path, outside, links: dict, manifest=None) -> Path:
    repo = tmp_path / "repo"
    write(repo, "recipes/good.yaml", RECIPE)
    write(repo, "bench/good.yaml", "framework: llama-benchy\n")
    write(repo, "tuning/vllm/good.json", "{}\n")
    write(repo, ".sparkrun/registry.yaml", manifest or "registries:\n  - name: hostile\n    recipes: recipes\n"
          "    benchmarks: bench\n    tuning: tuning\n    mods: mods\n")
    for link, target in links.items():
        path = repo / link
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target if target.startswith("../") else outside / target)
    subprocess.run([*GIT, "init", "-q"], cwd=repo, check=True)
    commit(repo, "hostile")
    return repo


@pytest.mark.parametrize("link", sorted(SYMLINKS))
def test_nothing_read_from_a_clone_resolves_outside_it(cli, tmp_path, outside, link):
    repo = hostile_repo(tmp_path, outside, {link: SYMLINKS[link]})
    assert cli("registry", "add", repo.as_uri(), check=0).stdout == "Added registry hostile (1 recipes)\n"
    clone = cli.home / "cache" / "registries" / "repo"
    assert (clone / link).is_symlink()  # it is there, and is never followed
    outputs = [cli("list", "--all", "--json", check=0), cli("registry", "list-benchmark-profiles", check=0),
               cli("run", "@hostile/good", "--solo", "--dry-run", check=0)]
    assert [r["name"] for r in json.loads(outputs[0].stdout) if r["source"] == "hostile"] == ["good"]
    tuning = cli.home / "cache" / "tuning" / "vllm"  # the dry run copied the registry's tuning configs
    assert sorted(p.name for p in tuning.rglob("[!.]*") if p.is_file()) == ["good.json", "sparkrun-tuning.json"]
    for result in outputs:
        assert "SECRET" not in result.stdout + result.stderr
    for file in tuning.rglob("*"):
        assert file.is_dir() or "SECRET" not in file.read_text()


def test_a_manifest_that_links_outside_is_refused(cli, tmp_path, outside):
    repo = hostile_repo(tmp_path, outside, {})
    (repo / ".sparkrun" / "registry.yaml").unlink()
    (repo / ".sparkrun" / "registry.yaml").symlink_to(outside / "manifest.yaml")
    commit(repo, "link the manifest")
    line = one_error_line(cli("registry", "add", repo.as_uri()))
    assert "a link to a file outside the repository; not read" in line


def test_a_registry_recipe_uses_no_mod_linked_from_outside(cli, tmp_path, outside):
    repo = hostile_repo(tmp_path, outside, {"mods/evil": "mods/evil"})
    write(repo, "recipes/modded.yaml", "recipe_version: '1'\nmodel: org/m\ncontainer: img:1\nmods: [mods/evil]\n"
                                       "command: vllm serve org/m --port {port}\n")
    commit(repo, "modded")
    cli("registry", "add", repo.as_uri(), check=0)
    line = one_error_line(cli("run", "@hostile/modded", "--solo", "--dry-run"))
    assert "mod(s) evil not found" in line


ESCAPES = ["\x1b[2J\x1b[H", "\x1b]8;;http://evil.invalid/\x07click\x1b]8;;\x07", "\x9b31m", "\rOVERWRITE",
           "\x07\x08\x08", "\x1bP+q\x1b\\", "\x00nul", "\x7fdel"]
ESCAPE_FIELDS = ["description", "model", "name", "filename"]


@pytest.mark.parametrize("field", ESCAPE_FIELDS)
@pytest.mark.parametrize("escape", ESCAPES, ids=[f"esc{i}" for i in range(len(ESCAPES))])
def test_registry_text_reaches_the_terminal_without_control_characters(cli, tmp_path, escape, field):
    description = f"desc {escape}" if field == "description" else "desc"
    model = f"org/m{escape}" if field == "model" else "org/m"
    body = RECIPE.replace("org/m", model) + f"metadata: {{description: {yaml_quote(description)}}}\n"
    if field == "name":
        body += f"name: {yaml_quote('n' + escape)}\nrecipe_version: '1'\n"
    filename = f"r{escape}.yaml" if field == "filename" and "\x00" not in escape else "r.yaml"
    repo = tmp_path / "repo"
    write(repo, f"recipes/{filename}", body)
    write(repo, ".sparkrun/registry.yaml", "registries:\n  - name: hostile\n    recipes: recipes\n"
          f"    description: {yaml_quote('reg ' + escape)}\n")
    subprocess.run([*GIT, "init", "-q"], cwd=repo, check=True)
    commit(repo)
    cli("registry", "add", repo.as_uri(), check=0)
    name = f"@hostile/{Path(filename).stem}"
    for args in (["list"], ["search", "desc"], ["show", name, "--no-vram"], ["registry", "list"],
                 ["run", name, "--solo", "--dry-run"], ["recipe", "validate", name]):
        result = cli(*args)
        assert not CONTROL.search(result.stdout.replace("\n", "").replace("\t", "")), (args, result.stdout)
        assert not CONTROL.search(result.stderr.replace("\n", "")), (args, result.stderr)


# -- ${VAR}: registries read only what the user allows; ${VAR:-default} -----------------------

SHELL_SECRETS = ["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "SSH_AUTH_SOCK", "HOME", "PATH", "OPENAI_API_KEY",
                 "MY_VAR", "DATABASE_URL", "KUBECONFIG", "X"]


@pytest.mark.parametrize("name", SHELL_SECRETS)
def test_registry_recipes_read_only_allowed_variables(tmp_path, name):
    environ = {name: "value-of-" + name, "HF_TOKEN": "hf_token_value"}
    recipe = sr.Recipe("r", tmp_path / "r.yaml", "hostile", model="org/m", command="x", env={"E": f"${{{name}}}"})
    with pytest.raises(sr.UsageError, match=rf"recipes from registry hostile may only read .*'allow_env'.*{name}"):
        sr.expand_env(recipe, environ, allowed={"HF_TOKEN"})
    recipe.env = {"E": f"${{{name}:-fallback}}"}
    assert sr.expand_env(recipe, environ, allowed={"HF_TOKEN"}) == ([("E", "fallback")],
                                                                     [("HF_TOKEN", "hf_token_value")])
    assert dict(sr.expand_env(recipe, environ, allowed={"HF_TOKEN", name})[1])["E"] == "value-of-" + name
    assert dict(sr.expand_env(recipe.replace(source="Local"), environ)[1])["E"] == "value-of-" + name


@pytest.mark.parametrize("text, environ, expected", [
    ("${HF_TOKEN:-}", {}, ""), ("${HF_TOKEN:-}", {"HF_TOKEN": "hf_x"}, "hf_x"), ("a${V:-b}c", {}, "abc"),
    ("${V:-x y z}", {}, "x y z"), ("${V:-}${W:-}", {}, ""), ("${V:-d}", {"V": ""}, "d"), ("${V}", {"V": ""}, ""),
    ("pre-${V}-post", {"V": "mid"}, "pre-mid-post"), ("${V:-${W}", {}, "${W"),
])
def test_variable_defaults(tmp_path, text, environ, expected):
    recipe = sr.Recipe("r", tmp_path / "r.yaml", "Local", model="org/m", command="x", env={"E": text})
    plain, secret = sr.expand_env(recipe, environ)
    assert dict(plain + secret)["E"] == expected


def test_allow_env_is_configured_in_registries_yaml(cli, tmp_path):
    repo = make_repo(tmp_path / "repo", {".sparkrun/registry.yaml": "registries:\n  - name: hostile\n    recipes: r\n",
                                         "r/grab.yaml": RECIPE + "env: {STOLEN: '${AWS_SECRET_ACCESS_KEY}'}\n"})
    cli("registry", "add", repo.as_uri(), check=0)
    env = {"AWS_SECRET_ACCESS_KEY": "aws-secret-value", "HF_TOKEN": "hf_token_value"}
    line = one_error_line(cli("run", "@hostile/grab", "--solo", "--dry-run", env=env))
    assert "may only read the variables listed under 'allow_env'" in line and "aws-secret" not in line
    config = cli.home / "config" / "registries.yaml"
    assert "allow_env:\n- HF_TOKEN\n" in config.read_text()
    config.write_text(config.read_text().replace("- HF_TOKEN\n", "- HF_TOKEN\n- AWS_SECRET_ACCESS_KEY\n"))
    shown = cli("run", "@hostile/grab", "--solo", "--dry-run", env=env, check=0).stdout
    assert "secret STOLEN=***" in shown and "secret HF_TOKEN=***" in shown and "aws-secret" not in shown


# -- credential-looking names are secrets everywhere, whatever their length ---------------------

CREDENTIAL_NAMES = [f"{p}{core}{s}" for core in ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS",
                                                 "PRIVATE", "AUTH", "PASS")
                    for p, s in (("", ""), ("MY_", ""), ("", "_FILE"))]
SHORT_SECRETS = ["q", "z9", "7#k"]


@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
def test_credential_names_are_secrets_in_every_view(tmp_path, name):
    value = SHORT_SECRETS[len(name) % 3]
    recipe = sr.Recipe("r", tmp_path / "r.yaml", "Local", model="org/m", container="img:1", command="serve",
                       env={name: value})
    plan = sr.plan_launch(recipe, sr.HostSelection(("h1",), None, "t"), sr.LaunchOptions(overrides={}),
                          environ={})
    spec = plan.containers[0]
    assert dict(spec.secret_env) == {name: value} and name not in dict(spec.env)
    script, data = sr.start_container_script(spec)
    shown = plan.describe()
    assert f"secret {name}=***" in shown and f"{name}={value}" not in shown + script
    assert data == f"{name}={value}\n".encode()  # only on ssh's stdin, after the script
    assert sr.recipe_as_dict(recipe.replace(source="x"))["env"][name] == "***"


def test_benchmark_dry_run_and_vv_never_show_secrets(cli, tmp_path):
    recipe = write(tmp_path, "r.yaml", RECIPE + "env: {DB_PASSWORD: 'p1', API_KEY: '${LAB_KEY}'}\n")
    env = {"LAB_KEY": "k2", "HF_TOKEN": "h3"}
    for args in (["benchmark", recipe, "--solo", "--dry-run"], ["run", recipe, "--solo", "--dry-run", "-vv"]):
        result = cli(*args, env=env, check=0)
        text = result.stdout + result.stderr
        assert "secret DB_PASSWORD=***" in text and "secret API_KEY=***" in text and "secret HF_TOKEN=***" in text
        assert not re.search(r"=(p1|k2|h3)\b", text)


# -- registry add: names normalized; nothing outside the clone folder is ever removed ---------

SPELLINGS = ["{repo}/.", "{repo}/./", "{repo}/sub/..", "{repo}/sub/../", "{repo}//", "{uri}/.", "{uri}/sub/..",
             "{uri}/./.", "{uri}/"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_registry_add_spellings_never_touch_other_clones_or_the_cache(cli, tmp_path, spelling):
    repo = make_repo(tmp_path / "myreg", {".sparkrun/registry.yaml": "registries:\n  - name: mine\n    recipes: r\n",
                                          "r/a.yaml": RECIPE, "sub/keep": "x\n"})
    other = make_repo(tmp_path / "other", {".sparkrun/registry.yaml": "registries:\n  - name: other\n    recipes: r\n",
                                           "r/b.yaml": RECIPE})
    cli("registry", "add", other.as_uri(), check=0)
    tuned = write(cli.home / "cache" / "tuning" / "vllm", "tuned-here.json", "{}\n")
    source = spelling.format(repo=repo, uri=repo.as_uri())
    assert cli("registry", "add", source, check=0).stdout == "Added registry mine (1 recipes)\n"
    clones = sorted(p.name for p in (cli.home / "cache" / "registries").iterdir())
    assert clones == ["myreg", "other"]
    cli("registry", "remove", "mine", check=0)
    assert tuned.is_file() and sorted(p.name for p in (cli.home / "cache" / "registries").iterdir()) == ["other"]


@pytest.mark.parametrize("clone", ["..", ".", "../..", "/", "/etc", "", "a/b", "a/../..", ".add-1", "../registries"])
def test_a_clone_folder_is_a_plain_name_under_the_registries_folder(clone, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARKRUN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(sr.UsageError, match="'clone' must be a plain folder name"):
        sr.clone_path(clone)
    assert sr.clone_path("eugr") == tmp_path / "cache" / "registries" / "eugr"


# Only names that stay inside this test's folder even if the check failed: an absolute one such as
# "/" would make a regression remove this machine's files (the unit test above covers those).
@pytest.mark.parametrize("clone", ["..", ".", "../..", "", "a/b", ".add-1", "../registries"])
def test_a_hand_edited_clone_folder_is_refused_before_anything_is_removed(cli, eugr_repo, clone):
    cli("registry", "add", eugr_repo, "--name", "eugr", "--path", "recipes", check=0)
    config = cli.home / "config" / "registries.yaml"
    config.write_text(config.read_text().replace("clone: eugr", f"clone: {yaml_quote(clone)}"))
    tuned = write(cli.home / "cache" / "tuning" / "vllm", "tuned-here.json", "{}\n")
    line = one_error_line(cli("registry", "remove", "eugr"))
    assert str(config) in line and "'clone' must be a plain folder name" in line
    assert tuned.is_file() and (cli.home / "cache" / "registries" / "eugr").is_dir()


@pytest.fixture
def eugr_repo(tmp_path):
    return make_repo(tmp_path / "eugr", {"recipes/a.yaml": RECIPE})


def test_stale_add_folders_are_cleaned_by_the_next_registry_command(cli, eugr_repo):
    cli("registry", "add", eugr_repo, "--name", "eugr", "--path", "recipes", check=0)
    root = cli.home / "cache" / "registries"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [root / f".add-{dead.pid}-abc", root / ".add-legacyname", root / ".add-notapid-x"]
    live = root / f".add-{os.getpid()}-inflight"
    for folder in stale + [live]:
        write(folder, "repo/file", "x\n")
    cli("registry", "list", check=0)
    assert [f for f in stale if f.exists()] == [] and live.is_dir() and (root / "eugr").is_dir()


def test_a_killed_registry_add_leaves_nothing_after_the_next_command(cli, eugr_repo, tmp_path):
    slow_git = write(tmp_path / "bin", "git", f"#!/bin/sh\n[ \"$3\" = clone ] || [ \"$5\" = clone ] && sleep 10\n"
                                              f"exec {shutil.which('git')} \"$@\"\n")
    slow_git.chmod(0o755)
    env = dict(cli.env, PATH=f"{slow_git.parent}:{os.environ['PATH']}")
    process = subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), "registry", "add", eugr_repo, "--name", "e",
                                "--path", "recipes"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = cli.home / "cache" / "registries"
    for _ in range(200):
        if root.is_dir() and list(root.glob(".add-*")):
            break
        threading.Event().wait(0.05)
    process.kill()
    process.wait()
    assert list(root.glob(".add-*"))
    cli("registry", "list", check=0)
    assert list(root.glob(".add-*")) == []


# -- one lock and an atomic replace for every configuration file ------------------------------

def concurrently(cli, commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    processes = [subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), *map(str, args)], env=cli.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL) for args in commands]
    outputs = [p.communicate(timeout=120) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(processes, outputs)]


def test_concurrent_registry_adds_enables_and_disables_all_count(cli, tmp_path):
    repos = [make_repo(tmp_path / f"reg{i}", {"recipes/a.yaml": RECIPE}) for i in range(6)]
    results = concurrently(cli, [["registry", "add", r, "--name", f"r{i}", "--path", "recipes"]
                                 for i, r in enumerate(repos)])
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    registries = {r["name"]: r for r in json.loads(cli("registry", "list", "--json", check=0).stdout)}
    assert sorted(registries) == [f"r{i}" for i in range(6)]
    concurrently(cli, [["registry", "disable" if i % 2 else "enable", f"r{i}"] for i in range(6)])
    registries = {r["name"]: r for r in json.loads(cli("registry", "list", "--json", check=0).stdout)}
    assert [registries[f"r{i}"]["enabled"] for i in range(6)] == [True, False] * 3
    assert [p.name for p in (cli.home / "config").iterdir() if p.name.endswith(".tmp")] == []


def test_concurrent_cluster_changes_all_count(cli):
    results = concurrently(cli, [["cluster", "create", f"c{i}", "--hosts", f"h{i}"] for i in range(8)])
    assert all(r.returncode == 0 for r in results)
    clusters = json.loads(cli("cluster", "list", "--json", check=0).stdout)["clusters"]
    assert sorted(clusters) == [f"c{i}" for i in range(8)]


def test_threads_of_one_process_share_the_lock(tmp_path):
    path = tmp_path / "counter.json"
    path.write_text("0")

    def bump():
        for _ in range(20):
            with sr.ConfigLock(path):
                with sr.ConfigLock(path):  # re-entrant
                    sr.atomic_write(path, str(int(path.read_text()) + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    sr.run_threads(threads)
    assert path.read_text() == "80"


# -- bad input: one line, exit 2 ----------------------------------------------------------------

def deep(levels: int, block: bool) -> str:
    if block:
        return RECIPE + "metadata:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(levels)) + \
            "  " * (levels + 1) + "v: 1\n"
    return RECIPE + "metadata: {a: " + "[" * levels + "]" * levels + "}\n"


def alias_bomb(fan: int, depth: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fan) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, depth)]
    return RECIPE + "metadata:\n" + "".join(f"  {line}\n" for line in lines)


BAD_FILES = {
    "latin1": "model: org/m\ndescription: caf\xe9\n".encode("latin-1") + RECIPE.encode(),
    "utf16": RECIPE.encode("utf-16"),
    "ff-bytes": b"\xff\xfe\xfd" + RECIPE.encode(),
    "cut-multibyte": RECIPE.encode() + "é".encode()[:1],
    "nul": RECIPE.encode() + b"\x00\n",
    "deep-flow-50": deep(50, False), "deep-flow-5000": deep(5000, False),
    "deep-block-40": deep(40, True), "deep-block-400": deep(400, True),
    "alias-9x9": alias_bomb(9, 9), "alias-2x40": alias_bomb(2, 40), "alias-50x5": alias_bomb(50, 5),
    "huge-comments": RECIPE + "#" * (2 << 20) + "\n",
    "million-lines": RECIPE + "\n" * 1_500_000,
    "python-tag": RECIPE + "x: !!python/object/apply:os.system ['touch PWNED']\n",
    "not-a-mapping": "- a\n- b\n", "scalar": "just text\n", "empty": "", "tabs": "model:\torg/m\n\tcommand: x\n",
    "unclosed": RECIPE + "defaults: {port: [\n",
}
WRONG_FIELDS = ["defaults: {port: abc}", "defaults: {port: .inf}", "defaults: {port: 0}", "defaults: {port: 65536}",
                "defaults: {port: -1}", "defaults: {port: true}", "defaults: {port: [1]}", "defaults: {port: 8000.5}",
                "defaults: {tensor_parallel: .inf}", "defaults: {tensor_parallel: 0}", "defaults: {tensor_parallel: x}",
                "defaults: {tensor_parallel: 1.5}", "defaults: {pipeline_parallel: -2}",
                "defaults: {gpu_memory_utilization: abc}", "defaults: {gpu_memory_utilization: .nan}",
                "pre_exec: [1, 2]", "pre_exec: [null]", "post_exec: [{a: 1}]", "mods: [1]", "build_args: [[1]]",
                "env: {A=B: x}", "env: {'A B': x}", "env: {A: [1, 2]}", "env: {A: {b: 1}}", "env: {A: \"x\\ny\"}",
                "min_nodes: x", "model_revision: ../..", "mode: both"]


def assert_one_line_exit_2(result, *names):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "internal error" not in lines[0], result.stderr
    for name in names:
        assert str(name) in lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_recipe_files_are_one_line_errors(cli, tmp_path, kind):
    path = write(tmp_path, f"{kind}.yaml", BAD_FILES[kind])
    for args in (["show", path, "--no-vram"], ["run", path, "--solo", "--dry-run"]):
        assert_one_line_exit_2(cli(*args), path)
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("field", WRONG_FIELDS)
def test_wrong_typed_fields_are_one_line_errors(cli, tmp_path, field):
    body = RECIPE + field + "\n" if not field.startswith("defaults") else RECIPE + field + "\n"
    path = write(tmp_path, "r.yaml", body)
    assert_one_line_exit_2(cli("run", path, "--solo", "--dry-run"), path)


BAD_FLAGS = [["--port", "0"], ["--port", "70000"], ["--port", "-1"], ["--init-port", "0"], ["--ray-port", "65536"],
             ["--dashboard-port", "99999"], ["-o", "port=70000"], ["-o", "port=abc"], ["-o", "tensor_parallel=0"],
             ["--tp", "0"], ["-o", "x=a b"], ["-o", "x=a\tb"], ["-o", "x=it's"], ["-o", 'x="q"'],
             ["-o", "served_model_name=m --trust-remote-code"], ["-o", "x=$(id)"], ["-o", "A=B=C D"],
             ["-o", "bad key=1"], ["-o", "noequals"], ["--image", "img:1 --privileged"], ["--cache-dir", "/a b"]]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=[" ".join(f) for f in BAD_FLAGS])
def test_bad_flag_values_are_one_line_errors(cli, tmp_path, flags):
    path = write(tmp_path, "r.yaml", RECIPE + "defaults: {served_model_name: m}\n")
    assert_one_line_exit_2(cli("run", path, "--solo", "--dry-run", *flags))


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom", "dir", "big", "binary", "missing"])
def test_bad_hosts_files_are_one_line_errors(cli, tmp_path, source):
    path = {"dir": tmp_path, "big": write(tmp_path, "big", "h1\n" * 100_000), "missing": tmp_path / "none",
            "binary": write(tmp_path, "bin", b"\xff\xfe\x00\x01")}.get(source, source)
    recipe = write(tmp_path, "r.yaml", RECIPE)
    assert_one_line_exit_2(cli("run", recipe, "--hosts-file", path, "--dry-run", timeout=60), path)
    assert_one_line_exit_2(cli("cluster", "create", "c", "--hosts-file", path, timeout=60), path)


CLUSTER_FILES = ["- a\n", "plain\n", "clusters: [a, b]\n", "clusters: {lab: [h1]}\n", "clusters: {lab: {hosts: h1}}\n",
                 "clusters: {lab: {hosts: [1, 2]}}\n", "clusters: {lab: {hosts: ['-oProxyCommand=x']}}\n",
                 "clusters: {lab: {hosts: ['a;b']}}\n", "clusters: {lab: {hosts: [h1], user: 'x y'}}\n",
                 "clusters: {'bad name': {hosts: [h1]}}\n", "default: nope\nclusters: {}\n",
                 "clusters: {lab: {hosts: [h1], description: [1]}}\n", "clusters: {lab: {hosts: [h1, h1]}}\n",
                 alias_bomb(9, 9), "\xff".encode("latin-1").decode("latin-1"), "clusters: {lab: {hosts: [h1]\n"]
REGISTRY_FILES = ["- a\n", "registries: {a: 1}\n", "registries: [1]\n", "registries: [{name: a}]\n",
                  "registries: [{name: a, url: u, clone: ..}]\n", "registries: [{name: a, url: u, clone: '/'}]\n",
                  "registries: [{name: 'a b', url: u, clone: a}]\n", "registries: [{name: a, url: 1, clone: a}]\n",
                  "registries: [{name: a, url: u, clone: a, recipes: ../x}]\n",
                  "registries: [{name: a, url: u, clone: a, enabled: maybe}]\n", "pending: [{name: x}]\n",
                  "allow_env: HF_TOKEN\n", "allow_env: ['A B']\n", alias_bomb(9, 9), "registries: [\n"]


@pytest.mark.parametrize("text", CLUSTER_FILES, ids=[f"clusters{i}" for i in range(len(CLUSTER_FILES))])
def test_bad_clusters_files_are_named(cli, text):
    path = write(cli.home / "config", "clusters.yaml", text.encode("latin-1") if text == "\xff" else text)
    for args in (["cluster", "list"], ["cluster", "create", "x", "--hosts", "h9"], ["status"]):
        assert_one_line_exit_2(cli(*args), path)


@pytest.mark.parametrize("text", REGISTRY_FILES, ids=[f"registries{i}" for i in range(len(REGISTRY_FILES))])
def test_bad_registries_files_are_named(cli, text):
    path = write(cli.home / "config", "registries.yaml", text)
    for args in (["list"], ["registry", "list"], ["registry", "remove", "a"]):
        assert_one_line_exit_2(cli(*args), path)


CACHE_GARBAGE = [b"not json", b"[]", b'{"x": 1}', b'{"x": {"stamp": 1}}', b'{"x": {"stamp": "1"}}', b"\xff\xfe",
                 b'{"format": 1, "files": [], "tree": 1}', b"null", b'{"models": [], "registry_files": {}}',
                 b'{"models": {"m": {"x": 1, "1": {"files": 3}}}}']
CACHE_FILES = ["yaml-cache.json", "completion.json", "tuning/vllm/sparkrun-tuning.json", "pending/1-1.json"]


@pytest.mark.parametrize("name", CACHE_FILES)
@pytest.mark.parametrize("garbage", CACHE_GARBAGE, ids=[f"garbage{i}" for i in range(len(CACHE_GARBAGE))])
def test_caches_that_are_not_what_sparkrun_wrote_are_rebuilt(cli, tmp_path, name, garbage):
    recipe = write(tmp_path, "r.yaml", RECIPE)
    cli("list", check=0)  # the cache exists, then is damaged
    write(cli.home / "cache", name, garbage)
    assert "qwen3-1.7b-vllm" in cli("list", check=0).stdout
    assert cli("run", recipe, "--solo", "--dry-run", check=0).stdout.startswith("Recipe:")
    assert cli("__complete", "bash", "cluster", "", check=0).stdout.split() == [
        "create", "default", "delete", "list", "set-default", "show", "status", "unset-default", "update"]
    assert "internal error" not in cli("status", "--solo", "--json", "--no-probe").stderr
    assert cli("list", check=0).stderr == ""


def test_install_records_of_another_shape_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKRUN_CONFIG_DIR", str(tmp_path))
    for garbage in ('{"method": "uv", "source": 5}', '{"method": 1}', "[]", '"x"', "\xff", '{"source": "/x"}'):
        (tmp_path / "install.json").write_text(garbage)
        assert lab_setup.read_install_record() == {}
    (tmp_path / "install.json").write_text('{"method": "pyz", "source": "/x"}')
    assert lab_setup.read_install_record() == {"method": "pyz", "source": "/x"}


BROKEN_REGISTRY_FILES = {k: BAD_FILES[k] for k in ("latin1", "deep-flow-5000", "alias-9x9", "huge-comments",
                                                   "not-a-mapping", "python-tag", "unclosed")}
BROKEN_REGISTRY_FILES.update({"port-abc": RECIPE + "defaults: {port: abc}\n", "env-key": RECIPE + "env: {'A=B': x}\n"})


@pytest.mark.parametrize("kind", sorted(BROKEN_REGISTRY_FILES))
def test_one_broken_registry_file_is_skipped_with_one_warning(cli, tmp_path, kind):
    repo = make_repo(tmp_path / "repo", {".sparkrun/registry.yaml": "registries:\n  - name: reg\n    recipes: r\n",
                                         "r/good-one.yaml": RECIPE, "r/good-two.yaml": RECIPE})
    write(repo, f"r/{kind}.yaml", BROKEN_REGISTRY_FILES[kind])
    commit(repo, "broken")
    cli("registry", "add", repo.as_uri(), check=0)
    for args in (["list"], ["search", "org"], ["list", "--json"]):
        result = cli(*args, check=0)
        assert "@reg/good-one" in result.stdout and "@reg/good-two" in result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Warning: ") and f"{kind}.yaml" in lines[0], result.stderr


# -- read-only or full folders are named; no stray temporary files -----------------------------

def in_small_mount(cli, mount_options: str, fill: bool, *args):
    """Run sparkrun with its config and cache folders on a tmpfs (read-only, or full)."""
    folder = cli.home / "mnt"
    folder.mkdir(exist_ok=True)
    env = dict(cli.env, SPARKRUN_CONFIG_DIR=str(folder / "config"), SPARKRUN_CACHE_DIR=str(folder / "cache"))
    prepare = f"mkdir -p {folder}/config {folder}/cache; echo 'registries: []' > {folder}/config/registries.yaml; "
    if fill:
        prepare += f"head -c 200000 /dev/zero > {folder}/filler 2>/dev/null; "
    script = (f"mount -t tmpfs -o size=64k tmpfs {folder} && {prepare}"
              f"{'mount -o remount,ro ' + str(folder) + ' && ' if 'ro' in mount_options else ''}"
              f"{sys.executable} {REPO / 'sparkrun.py'} {' '.join(map(str, args))}; rc=$?; "
              f"find {folder} -name '*.tmp' -o -name '.*.tmp*'; exit $rc")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=60), folder


@pytest.mark.parametrize("mode", ["ro", "full"])
@pytest.mark.parametrize("command", [["cluster", "create", "c", "--hosts", "h1"], ["cluster", "unset-default"],
                                     ["registry", "update"]])
def test_read_only_or_full_config_folders_are_named(cli, mode, command):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces")
    result, folder = in_small_mount(cli, mode, mode == "full", *command)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write in {folder}/config: "), result.stderr
    assert ("Read-only file system" if mode == "ro" else "No space left on device") in lines[0]
    assert result.stdout == ""  # no stray temporary file found


@pytest.mark.parametrize("mode", ["ro", "full"])
@pytest.mark.parametrize("command", [["list"], ["show", "qwen3-1.7b-vllm", "--no-vram"],
                                     ["run", "qwen3-1.7b-vllm", "--solo", "--dry-run"]])
def test_a_read_only_or_full_cache_only_costs_speed(cli, mode, command):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces")
    result, _ = in_small_mount(cli, mode, mode == "full", *command)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert ".tmp" not in result.stdout  # no stray temporary file found


# -- a closed stdout ends quietly ------------------------------------------------------------

@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["search", "qwen"], ["cluster", "list"],
                                     ["show", "qwen3-1.7b-vllm", "--no-vram"], ["registry", "list"], ["--help"]])
def test_a_closed_stdout_ends_quietly(cli, command):
    read, write_end = os.pipe()
    os.close(read)  # like `| head` that has already exited
    try:
        done = subprocess.run([sys.executable, str(REPO / "sparkrun.py"), *command], env=cli.env,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode in (0, sr.SIGPIPE_EXIT)


# -- on the test bed: secrets on a dropped connection, concurrent runs, a host lost mid-launch --


SECRET = "bed-secret-value-9137"


def files_holding(host, text: str) -> list[Path]:
    return [p for root in (host.tmp, host.home) for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()]


@pytest.mark.parametrize("drop", ["host-down", "client-killed"])
def test_secrets_leave_nothing_on_the_host_when_the_connection_drops(lab, tmp_path, drop):
    recipe = write(tmp_path, "secretive.yaml", f"model: Qwen/Qwen3-1.7B\nruntime: vllm\ncontainer: {IMAGES['vllm']}\n"
                   "defaults: {served_model_name: qwen3-1.7b}\nenv: {LAB_API_KEY: '${LAB_SECRET}'}\n"
                   "command: vllm serve {model} --served-model-name {served_model_name} --port {port}\n")
    host = lab.bed.hosts[0]
    host.fault("docker_run_slow", "30")
    process = subprocess.Popen([sys.executable, str(REPO / "sparkrun.py"), "run", recipe, "-H", H1, "--no-sync",
                                "--no-follow"], env=dict(lab.env, LAB_SECRET=SECRET), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    wait_for_line(process.stderr, "starting head")
    for _ in range(200):  # until docker run is on the host, waiting on its daemon
        if "docker run" in host.ssh("ps -eo args").stdout:
            break
        threading.Event().wait(0.05)
    if drop == "host-down":
        host.down()
    else:
        os.killpg(process.pid, 9)  # sparkrun and its ssh client: the session's stdin closes
    process.communicate(timeout=60)
    host.up()
    host.fault("docker_run_slow", None)
    assert files_holding(host, SECRET) == []
    assert SECRET not in host.ssh("ps -eo args").stdout
    end_docker_runs(host)  # the one left waiting would create its container during a later test


def end_docker_runs(host) -> None:
    """Stop the `docker run` stand-ins this test left on the host, by PID."""
    listing = host.ssh("ps -eo pid=,args=").stdout.splitlines()
    pids = [line.split()[0] for line in listing if " run -d --name sparkrun_" in line]
    if pids:
        host.ssh(f"kill {' '.join(pids)}")


def test_two_runs_of_one_recipe_at_once_one_wins(lab):
    for host in lab.bed.hosts[:2]:
        host.fault("docker_run_slow", "2")  # both pass preflight before either creates its container
    runs = [popen(lab, "run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--no-follow")
            for _ in range(2)]
    results = [(p.wait(180), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    _, _, loser_err = next(r for r in results if r[0] == 1)
    assert "qwen3-1.7b-vllm is already running as sparkrun_" in loser_err and "--replace" in loser_err
    running = [c["name"] for h in lab.bed.hosts[:2] for c in h.containers() if c["running"]]
    assert sorted(running) == sorted(n for h in lab.bed.hosts[:2] for n in [c["name"] for c in h.containers()])
    assert len(running) == 2  # the winner's head and worker: nothing of it was removed
    lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", check=0)


def test_an_interrupted_launch_names_what_it_could_not_remove_on_a_lost_host(lab):
    """Ctrl+C before every container started rolls back; a host lost meanwhile is named, not
    reported as cleaned."""
    head, worker = lab.bed.hosts[:2]
    worker.fault("docker_run_slow", "3")  # the worker's start is in flight when Ctrl+C comes
    process = popen(lab, "run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--no-follow")
    wait_for_line(process.stderr, "starting worker1")
    for _ in range(200):
        if "docker run" in worker.ssh("ps -eo args").stdout:
            break
        threading.Event().wait(0.05)
    process.send_signal(signal.SIGINT)
    wait_for_line(process.stderr, "container start(s) in flight")
    head.down()  # lost while the rollback waits for the worker's start
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert re.search(rf"containers possibly left on hosts that could not be reached \({re.escape(head.addr)}: "
                     rf"sparkrun_\w+_head\)", last), err
    assert worker.containers() == []  # the reachable host was cleaned, its late start included
    head.up()
    lab("stop", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", check=0)


@pytest.mark.parametrize("lost, stage", [(0, "rendezvous"), (1, "readiness"), (1, "docker run")])
def test_a_host_lost_mid_launch_is_named_with_what_may_be_left(lab, lost, stage):
    host = lab.bed.hosts[lost]
    fault = {"rendezvous": ("engine_slow_ready", "60"), "readiness": ("engine_slow_ready", "60"),
             "docker run": ("docker_run_slow", "60")}[stage]
    host.fault(*fault)
    process = popen(lab, "run", "qwen3-1.7b-vllm", "-H", f"{H1},{H2}", "--tp", "2", "--no-sync", "--no-follow")
    wait_for_line(process.stderr, {"rendezvous": "waiting for", "readiness": "waiting for http://",
                                   "docker run": "starting worker1"}[stage])
    if stage == "docker run":
        for _ in range(200):
            if "docker run" in host.ssh("ps -eo args").stdout:
                break
            threading.Event().wait(0.05)
    host.down()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: {host.addr}: ") and "did not open in 600 s" not in last, err
    role = "head" if lost == 0 else "worker1"
    assert re.search(rf"containers possibly left on hosts that could not be reached \({re.escape(host.addr)}: "
                     rf"sparkrun_\w+_{role}\); once they are back, run: sparkrun stop qwen3-1.7b-vllm -H {host.addr}",
                     last), last
    other = lab.bed.hosts[1 - lost]
    assert [c for c in other.containers() if c["running"]] == []  # the reachable host was cleaned
    host.up()
