"""The documents the project points to: RECIPES.md describes every recipe field sparkrun knows and
its examples are real recipes; LICENSE is the Apache-2.0 text pyproject.toml names."""

import re
import tomllib

import pytest

import sparkrun as sr
from conftest import REPO

bench = sr.command_module("benchmark")

RECIPES_MD = REPO / "RECIPES.md"
# The metadata keys sparkrun reads: VRAM hints (recipe validate checks the first three) and the
# description list and show print.
METADATA_KEYS = ("model_params", "model_dtype", "kv_dtype", "num_layers", "num_kv_heads", "head_dim", "description")


def known_fields() -> set[str]:
    """Every name a recipe may use that sparkrun gives a meaning: top-level fields, metadata keys,
    benchmark block keys, modes, runtimes, and the defaults the CLI flags and default commands use."""
    defaults = set(sr.TYPED_FLAGS.values()) | set(sr.BUILTIN_VALUES)
    for runtime in sr.RUNTIMES:
        defaults |= {key for key, _ in sr.default_command(runtime)[1]}
    return (set(sr.RECIPE_FIELDS) | set(METADATA_KEYS) | set(bench.BENCHMARK_SETTINGS) | set(sr.MODES)
            | set(sr.RUNTIMES) | defaults)


def test_every_known_field_is_documented():
    text = RECIPES_MD.read_text()
    missing = sorted(f for f in known_fields() if f"`{f}`" not in text)
    assert missing == []


def yaml_examples() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", RECIPES_MD.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(yaml_examples())))
def test_examples_load_validate_and_render(tmp_path, index):
    path = tmp_path / f"example-{index}.yaml"
    path.write_text(yaml_examples()[index])
    recipe = sr.load_recipe(path)
    assert sr.validate_recipe(recipe) == ([], [])
    assert "{" not in sr.render_command(recipe, sr.recipe_values(recipe))


def test_license_is_the_apache_2_text_pyproject_names():
    text = (REPO / "LICENSE").read_text()
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    sections = re.findall(r"^   (\d)\. ([A-Z][^.]+)\.", text, re.M)
    assert [title for _, title in sections] == [
        "Definitions", "Grant of Copyright License", "Grant of Patent License", "Redistribution",
        "Submission of Contributions", "Trademarks", "Disclaimer of Warranty", "Limitation of Liability",
        "Accepting Warranty or Additional Liability"]
    assert "END OF TERMS AND CONDITIONS" in text and "http://www.apache.org/licenses/LICENSE-2.0" in text
