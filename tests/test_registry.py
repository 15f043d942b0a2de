"""Recipe registries: real git repositories built from the corpus, added by file:// URL and by path.

Nothing here leaves 127.0.0.0/8: remotes are local folders, file:// URLs or a closed local port.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import sparkrun as sr
from conftest import CORPUS

GIT = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]
ARENA = CORPUS / "spark-arena-recipe-registry"
EUGR = CORPUS / "eugr-spark-vllm-docker"
DBOT = CORPUS / "dbotwinick-sparkrun-recipe-registry"
UNREACHABLE = "http://127.0.0.1:9/none.git"  # nothing listens on the discard port


def commit(repo: Path, message: str = "update") -> None:
    for args in (["add", "-A"], ["commit", "-q", "-m", message]):
        subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True)


def make_repo(path: Path, files: dict) -> Path:
    """A git repository at `path` holding `files` (destination -> corpus folder, or text), committed."""
    for dest, src in files.items():
        target = path / dest
        if isinstance(src, Path):
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(src)
    subprocess.run([*GIT, "init", "-q"], cwd=path, check=True)
    commit(path, "initial")
    return path


@pytest.fixture
def arena(tmp_path):
    """spark-arena's registry (official + hidden experimental), a tuning folder and an unrelated one."""
    repo = make_repo(tmp_path / "arena", {".": ARENA, "unrelated/big.txt": "not a registry folder\n"})
    (repo / "tuning").mkdir()
    (repo / "tuning" / "gb10.json").write_text("{}\n")
    commit(repo, "tuning")  # two commits: the clone must be shallow
    return repo


@pytest.fixture
def eugr(tmp_path):
    """eugr's recipes (no manifest) and a mods folder with the mod spark-arena's recipes use."""
    return make_repo(tmp_path / "eugr", {"recipes": EUGR / "recipes",
                                         "mods/fix-qwen3.5-chat-template/run.sh": "#!/bin/sh\n"})


@pytest.fixture
def dbot(tmp_path):
    return make_repo(tmp_path / "dbot", {".": DBOT})


def add_eugr(cli, repo, check=0):
    return cli("registry", "add", repo, "--name", "eugr", "--path", "recipes", "--mods", "mods", check=check)


def names(cli, *args, env=None):
    return [r["qualified"] for r in json.loads(cli(*args, "--json", env=env, check=0).stdout)]


def registries(cli):
    return {r["name"]: r for r in json.loads(cli("registry", "list", "--json", check=0).stdout)}


def one_error_line(result, code=2):
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_manifest_with_two_registries_by_file_url(cli, arena):
    result = cli("registry", "add", arena.as_uri(), check=0)
    assert result.stdout.splitlines() == ["Added registry official (9 recipes)",
                                          "Added registry experimental (28 recipes; hidden, shown with --all)"]
    regs = registries(cli)
    assert [(r["url"], r["recipes"], r["enabled"], r["visible"]) for r in regs.values()] == [
        (arena.as_uri(), 9, True, True), (arena.as_uri(), 28, True, False)]
    clone = cli.home / "cache" / "registries" / "arena"
    assert sorted(p.name for p in clone.iterdir()) == [
        ".git", ".sparkrun", "benchmarking", "experimental-recipes", "official-recipes", "tuning"]
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=clone,
                             capture_output=True, text=True)
    assert shallow.stdout.strip() == "true"

    visible = names(cli, "list")
    assert "@official/minimax-m2.7-awq4-vllm" in visible and "qwen3-1.7b-vllm" in visible
    assert not [n for n in visible if n.startswith("@experimental/")]
    everything = names(cli, "list", "--all")
    assert len(everything) == 4 + 9 + 28 and "@experimental/minimax-m3-v0-nvfp4-4x" in everything
    assert names(cli, "search", "minimax m3") == []
    assert len(names(cli, "search", "minimax m3", "--all")) == 3
    sglang = names(cli, "list", "--all", "--runtime", "sglang")
    assert "@experimental/minimax-m3-v0-nvfp4-4x" in sglang and "@official/minimax-m2.7-awq4-vllm" not in sglang

    # Hidden recipes need --all in show as in list.
    for name in ("@experimental/minimax-m3-v0-nvfp4-4x", "minimax-m3-v0-nvfp4-4x"):
        assert one_error_line(cli("show", name, "--no-vram")) == "Error: " + sr.HIDDEN_RECIPE.format(
            name=name, where="@experimental/minimax-m3-v0-nvfp4-4x")
    shown = cli("show", "@experimental/minimax-m3-v0-nvfp4-4x", "--no-vram", "--all", check=0).stdout
    assert "Repository:   experimental" in shown
    bare = json.loads(cli("show", "minimax-m3-v0-nvfp4-4x", "--no-vram", "--json", "--all", check=0).stdout)
    assert bare["repository"] == "experimental"
    assert cli("show", "minimax-m3-v0-nvfp4-4x", "--all", "--runtime", "sglang", "--no-vram").returncode == 0
    assert "is not a vllm recipe (runtime sglang)" in one_error_line(
        cli("show", "minimax-m3-v0-nvfp4-4x", "--all", "--runtime", "vllm", "--no-vram"))


def test_repository_without_manifest_by_path(cli, eugr):
    line = one_error_line(cli("registry", "add", eugr))
    assert line == f"Error: {eugr} has no .sparkrun/registry.yaml; add it with --name NAME --path FOLDER"
    line = one_error_line(cli("registry", "add", eugr, "--name", "eugr"))
    assert line == "Error: --name and --path go together (the registry's name and recipes folder)"
    assert add_eugr(cli, eugr).stdout == "Added registry eugr (32 recipes)\n"
    assert registries(cli)["eugr"]["url"] == str(eugr)
    eugr_recipes = names(cli, "list", "--runtime", "eugr-vllm")
    assert len(eugr_recipes) == 32 and all(n.startswith("@eugr/") for n in eugr_recipes)
    # One stem in three folders: the nested ones are named by their path in the recipes folder.
    assert {"@eugr/qwen3.5-397b-int4-autoround", "@eugr/3x-spark-cluster/qwen3.5-397b-int4-autoround",
            "@eugr/4x-spark-cluster/qwen3.5-397b-int4-autoround"} <= set(eugr_recipes)
    shown = cli("show", "@eugr/4x-spark-cluster/qwen3.5-397b-int4-autoround", "--no-vram", check=0).stdout
    assert "TP=4 across 4 DGX Spark nodes" in shown and "Repository:   eugr" in shown
    # Name: is the recipe's name: field, and that name finds the recipe as its file stem does.
    by_stem = cli("show", "openai-gpt-oss-120b", "--no-vram", check=0).stdout
    assert by_stem.startswith("Name:         OpenAI GPT-OSS 120B\n")
    assert cli("show", "OpenAI GPT-OSS 120B", "--no-vram", check=0).stdout == by_stem
    assert cli("show", "@eugr/OpenAI GPT-OSS 120B", "--no-vram", check=0).stdout == by_stem


def test_benchmark_profiles(cli, arena, dbot):
    cli("registry", "add", arena.as_uri(), check=0)
    cli("registry", "add", dbot, check=0)
    profiles = json.loads(cli("registry", "list-benchmark-profiles", "--json", check=0).stdout)
    assert [(p["name"], p["framework"]) for p in profiles] == [
        ("@official/spark-arena-v1", "llama-benchy"), ("@official/spark-arena-v2", "llama-benchy"),
        ("@sparkrun-testing/spark-arena-v1", "llama-benchy"),
        ("@sparkrun-testing/sparkrun-smoke1", "llama-benchy")]
    assert one_error_line(cli("registry", "show-benchmark-profile", "spark-arena-v1")) == (
        "Error: benchmark profile 'spark-arena-v1' is ambiguous: @official/spark-arena-v1, "
        "@sparkrun-testing/spark-arena-v1; use one of these names")
    shown = cli("registry", "show-benchmark-profile", "@official/spark-arena-v1", check=0).stdout
    assert shown.startswith("Name:         spark-arena-v1\nRepository:   official\n")
    assert shown.endswith((ARENA / "benchmarking" / "spark-arena-v1.yaml").read_text())
    data = json.loads(cli("registry", "show-benchmark-profile", "sparkrun-smoke1", "--json", check=0).stdout)
    assert data == sr.parse_yaml((DBOT / "testing" / "benchmarking" / "sparkrun-smoke1.yaml").read_text(), "x")
    assert "no benchmark profile named 'nope'" in one_error_line(cli("registry", "show-benchmark-profile", "nope"))


def test_update_picks_up_a_new_commit(cli, arena):
    cli("registry", "add", arena.as_uri(), check=0)
    extra = arena / "official-recipes" / "extra" / "extra-vllm.yaml"
    extra.parent.mkdir()
    shutil.copy(ARENA / "official-recipes" / "minimax-m2.7" / "minimax-m2.7-awq4-vllm.yaml", extra)
    commit(arena)
    assert "@official/extra-vllm" not in names(cli, "list")  # no automatic fetch
    result = cli("registry", "update", check=0)
    assert result.stdout.startswith("official, experimental: updated ")
    assert "@official/extra-vllm" in names(cli, "list")
    assert registries(cli)["official"]["recipes"] == 10
    assert cli("registry", "update", "official", check=0).stdout.startswith("official, experimental: up to date (")


def test_update_with_the_remote_gone_keeps_the_last_good_copy(cli, arena, eugr):
    cli("registry", "add", arena.as_uri(), check=0)
    add_eugr(cli, eugr)
    arena.rename(arena.with_name("moved-away"))
    start = time.monotonic()
    result = cli("registry", "update")
    assert time.monotonic() - start < 5
    line = one_error_line(result, code=1)
    assert line.startswith(f"Error: could not update official, experimental from {arena.as_uri()}: ")
    assert "does not appear to be a git repository" in line and line.endswith("; kept the last good copy")
    assert result.stdout.startswith("eugr: up to date (")
    assert "@official/minimax-m2.7-awq4-vllm" in names(cli, "list")


def test_unreachable_url_fails_once_fast_and_changes_nothing(cli, eugr):
    add_eugr(cli, eugr)
    before = (cli.home / "config" / "registries.yaml").read_bytes()
    start = time.monotonic()
    line = one_error_line(cli("registry", "add", UNREACHABLE), code=1)
    assert time.monotonic() - start < 1
    assert line.startswith(f"Error: cannot clone {UNREACHABLE}: unable to access '{UNREACHABLE}/': ")
    assert (cli.home / "config" / "registries.yaml").read_bytes() == before


def test_enable_disable(cli, eugr):
    add_eugr(cli, eugr)
    assert cli("registry", "disable", "eugr", check=0).stdout == "Registry eugr disabled\n"
    assert registries(cli)["eugr"]["enabled"] is False
    assert not [n for n in names(cli, "list") if n.startswith("@eugr/")]
    assert one_error_line(cli("show", "@eugr/openai-gpt-oss-120b")).startswith("Error: no recipe named")
    cli("registry", "enable", "eugr", check=0)
    assert len([n for n in names(cli, "list") if n.startswith("@eugr/")]) == 32
    assert one_error_line(cli("registry", "enable", "nope")) == (
        "Error: no registry named 'nope'; see 'sparkrun registry list'")


def test_ambiguous_names_list_candidates(cli, arena, tmp_path):
    cli("registry", "add", arena.as_uri(), check=0)
    bundled = make_repo(tmp_path / "formerly", {"recipes": CORPUS / "sparkrun-formerly-bundled" / "recipes"})
    cli("registry", "add", bundled, "--name", "formerly", "--path", "recipes", check=0)
    # Without --all the hidden copy is out of sight; with it, the name is shared.
    assert "Repository:   official" in cli("show", "qwen3-coder-next-int4-autoround-vllm", "--no-vram", check=0).stdout
    assert one_error_line(cli("show", "qwen3-coder-next-int4-autoround-vllm", "--all")) == (
        "Error: recipe name 'qwen3-coder-next-int4-autoround-vllm' is ambiguous: "
        "@official/qwen3-coder-next-int4-autoround-vllm, @experimental/qwen3-coder-next-int4-autoround-vllm; "
        "use one of these names")
    assert "qwen3-1.7b-vllm, @formerly/qwen3-1.7b-vllm;" in one_error_line(cli("show", "qwen3-1.7b-vllm"))
    shown = cli("show", "@official/qwen3-coder-next-int4-autoround-vllm", "--no-vram", check=0).stdout
    assert "Repository:   official" in shown
    assert "Repository:   formerly" in cli("show", "@formerly/qwen3-1.7b-vllm", "--no-vram", check=0).stdout


MANIFEST_ERRORS = [
    ("registries:\n  - name: broken\n    recipes: [unclosed\n", "malformed YAML (line 4)"),
    ("registries:\n  - name: nope\n    recipes: no-such-folder\n",
     "registry 'nope': recipes folder 'no-such-folder' not found in the repository"),
    ("registries: {name: x}\n", "expected 'registries:' with a list of registries"),
    ("registries:\n  - name: x\n    recipes: ../outside\n", "'recipes' must name a folder inside the repository"),
]


@pytest.mark.parametrize("manifest, message", MANIFEST_ERRORS)
def test_bad_manifest_leaves_configuration_unchanged(cli, eugr, tmp_path, manifest, message):
    add_eugr(cli, eugr)
    config = cli.home / "config" / "registries.yaml"
    before = config.read_bytes()
    bad = make_repo(tmp_path / "bad", {".sparkrun/registry.yaml": manifest, "recipes/r.yaml": "model: a/b\n"})
    line = one_error_line(cli("registry", "add", bad.as_uri()))
    assert line.startswith(f"Error: {bad.as_uri()}") and message in line
    assert config.read_bytes() == before
    assert [p.name for p in (cli.home / "cache" / "registries").iterdir()] == ["eugr"]


def test_adding_an_existing_name_says_so(cli, eugr):
    add_eugr(cli, eugr)
    before = (cli.home / "config" / "registries.yaml").read_bytes()
    assert one_error_line(add_eugr(cli, eugr, check=None)) == (
        "Error: a registry named 'eugr' already exists; remove it first or add this one with another --name")
    assert (cli.home / "config" / "registries.yaml").read_bytes() == before


def test_remove_deletes_the_clone_once_unused(cli, arena):
    cli("registry", "add", arena.as_uri(), check=0)
    clone = cli.home / "cache" / "registries" / "arena"
    assert cli("registry", "remove", "experimental", check=0).stdout == "Removed registry experimental\n"
    assert clone.is_dir() and list(registries(cli)) == ["official"]
    cli("registry", "remove", "official", check=0)
    assert not clone.exists() and registries(cli) == {}


def test_unreachable_defaults_warn_once_and_are_not_retried(cli):
    env = {"SPARKRUN_DEFAULT_REGISTRIES": UNREACHABLE}
    start = time.monotonic()
    result = cli("list", "--json", env=env, check=0)
    assert time.monotonic() - start < 1
    lines = result.stderr.splitlines()
    before, after = sr.DEFAULTS_UNAVAILABLE.split("{}")
    assert len(lines) == 1
    assert lines[0].startswith(f"Warning: {before}cannot clone {UNREACHABLE}: unable to access ")
    assert lines[0].endswith(after)
    assert {"qwen3-1.7b-vllm", "nemotron3-nano-30b-nvfp4-vllm"} <= {r["name"] for r in json.loads(result.stdout)}
    again = cli("list", env=env, check=0)
    assert again.stderr == ""
    assert json.loads(cli("registry", "list", "--json", env=env, check=0).stdout)[0]["pending"] is True
    line = one_error_line(cli("registry", "update", env=env), code=1)
    assert line.startswith(f"Error: cannot clone {UNREACHABLE}: ")
    removed = cli("registry", "remove", UNREACHABLE, env=env, check=0)
    assert removed.stdout == f"Removed pending registry {UNREACHABLE}\n"
    assert cli("registry", "update", env=env, check=0).stderr == ""


def test_defaults_tried_once_then_only_by_update(cli, arena, eugr, tmp_path):
    later = tmp_path / "later"  # does not exist yet: the first use cannot fetch it
    env = {"SPARKRUN_DEFAULT_REGISTRIES": f"{arena.as_uri()},{later.as_uri()}#name=eugr,path=recipes,mods=mods"}
    first = cli("list", "--all", "--json", env=env, check=0)
    assert len(first.stderr.splitlines()) == 1 and later.as_uri() in first.stderr
    assert "@experimental/minimax-m3-v0-nvfp4-4x" in [r["qualified"] for r in json.loads(first.stdout)]
    eugr.rename(later)
    assert not [n for n in names(cli, "list", env=env) if n.startswith("@eugr/")]  # not retried
    updated = cli("registry", "update", env=env, check=0)
    assert updated.stdout.splitlines()[-1] == f"eugr: added from {later.as_uri()}"
    assert len([n for n in names(cli, "list", env=env) if n.startswith("@eugr/")]) == 32
    assert "pending" not in (cli.home / "config" / "registries.yaml").read_text()


def test_warm_list_runs_no_git_and_imports_no_yaml(cli, arena, eugr, tmp_path):
    cli("registry", "add", arena.as_uri(), check=0)
    add_eugr(cli, eugr)
    cli("list", check=0)  # fills the parsed-YAML cache
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'git-calls'}\nexit 1\n")
    (fake / "git").chmod(0o755)
    result = cli("list", env={"PATH": f"{fake}:{cli.env['PATH']}", "PYTHONPROFILEIMPORTTIME": "1"}, check=0)
    assert "@eugr/openai-gpt-oss-120b" in result.stdout
    assert not (tmp_path / "git-calls").exists()
    assert " yaml" not in result.stderr


def test_reusable_functions(cli, arena, eugr, monkeypatch):
    cli("registry", "add", arena.as_uri(), check=0)
    add_eugr(cli, eugr)
    for name, value in cli.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sr, "YAML_CACHE", sr.ParsedYamlCache())
    clones = cli.home / "cache" / "registries"
    experimental = sr.find_recipe("@experimental/qwen3.5-122b-a10b-fp8-vllm")
    assert experimental.mods == ["mods/fix-qwen3.5-chat-template"]
    assert sr.registry_mods_dir(experimental) == clones / "eugr" / "mods"  # experimental-mods does not exist
    assert sr.registry_mods_dir(sr.find_recipe("qwen3-1.7b-vllm")) == clones / "eugr" / "mods"
    assert sr.registry_tuning_dirs() == [clones / "arena" / "tuning"]
    path, data = sr.find_benchmark_profile("@official/spark-arena-v2")
    assert path == clones / "arena" / "benchmarking" / "spark-arena-v2.yaml"
    assert data["framework"] == "llama-benchy"
    assert sr.update_registries(["eugr"]) is True


@pytest.mark.parametrize("text, sources", [
    ("", []),
    ("file:///srv/a.git", [{"url": "file:///srv/a.git"}]),
    ("https://example.invalid/x.git, /srv/eugr#name=eugr,path=recipes,mods=mods",
     [{"url": "https://example.invalid/x.git"},
      {"url": "/srv/eugr", "name": "eugr", "path": "recipes", "mods": "mods"}]),
])
def test_default_sources_from_environment(monkeypatch, text, sources):
    monkeypatch.setenv("SPARKRUN_DEFAULT_REGISTRIES", text)
    assert sr.default_sources() == sources
    monkeypatch.delenv("SPARKRUN_DEFAULT_REGISTRIES")
    assert [s["url"] for s in sr.default_sources()] == [
        "https://github.com/spark-arena/recipe-registry.git", "https://github.com/eugr/spark-vllm-docker.git"]


def test_repositories_with_one_folder_name_get_their_own_clones(cli, tmp_path):
    recipe = (ARENA / "official-recipes" / "minimax-m2.7" / "minimax-m2.7-awq4-vllm.yaml").read_text()
    for name in ("a", "b"):
        repo = make_repo(tmp_path / name / "recipes", {f"r/{name}-only.yaml": recipe})
        cli("registry", "add", repo, "--name", name, "--path", "r", check=0)
    assert sorted(p.name for p in (cli.home / "cache" / "registries").iterdir()) == ["recipes", "recipes-2"]
    assert {"@a/a-only", "@b/b-only"} <= set(names(cli, "list"))
