"""The command line itself: option names, run lines reused as stop and logs lines, usage on errors."""

import pytest

import sparkrun as sr

RUN_LINE = ["-H", "h1,h2", "--solo", "--port", "9000", "--tensor-parallel", "2", "--gpu-mem", "0.5",
            "--max-model-len", "4096", "--image", "img:2", "--cache-dir", "/data/hf", "--option", "k=v",
            "-o", "x=1", "--dry-run", "--detect", "--foreground", "--no-follow", "--replace", "--no-sync",
            "--strict", "--ready-timeout", "60", "--init-port", "29600", "--ray-port", "46400", "--dashboard",
            "--dashboard-port", "8300", "--no-sync-tuning"]


def parse(*argv):
    return sr.build_parser(list(argv)).parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ["run", "r"], ["stop", "r"], ["logs", "r"], ["benchmark", "r"], ["recipe", "vram", "r"]])
def test_tensor_parallel_long_name(argv):
    assert parse(*argv, "--tensor-parallel", "2").tp == 2 == parse(*argv, "--tp", "2").tp


def test_option_long_name():
    assert parse("run", "r", "--option", "a=1", "-o", "b=2").override == ["a=1", "b=2"]
    assert parse("benchmark", "r", "--option", "depth=0,4096").bench_args == ["depth=0,4096"]


@pytest.mark.parametrize("command", ["stop", "logs"])
def test_stop_and_logs_take_a_whole_run_line(command):
    args = parse(command, "qwen3-1.7b-vllm", *RUN_LINE)
    assert (args.recipe, args.hosts, args.tp, args.port) == ("qwen3-1.7b-vllm", "h1,h2", 2, 9000)
    run = sr.build_parser(["run"])._subparsers._group_actions[0].choices["run"]
    mine = sr.build_parser([command])._subparsers._group_actions[0].choices[command]
    run_options = {o for a in run._actions for o in a.option_strings}
    assert run_options <= set(mine._option_string_actions)


@pytest.mark.parametrize("argv, usage", [
    (["run", "qwen3-1.7b-vllm", "--bogus"], "usage: sparkrun run "),
    (["stop", "--bogus"], "usage: sparkrun stop "),
    (["recipe", "validate", "x.yaml", "--bogus"], "usage: sparkrun recipe validate "),
    (["registry", "list", "--bogus"], "usage: sparkrun registry list "),
    (["cluster", "create", "lab", "--bogus"], "usage: sparkrun cluster create "),
    (["--bogus", "list"], "usage: sparkrun [-h]"),
])
def test_unknown_option_prints_the_commands_usage(cli, argv, usage):
    result = cli(*argv)
    assert result.returncode == 2 and result.stderr.startswith(usage)
    assert result.stderr.rstrip().endswith("error: unrecognized arguments: --bogus")
