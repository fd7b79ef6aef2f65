"""Recipes: every shipped recipe round-trips (load -> dump -> load) to the same pipeline; errors are clear."""

import pytest
import yaml

from slimc.compiler.pipeline.recipes import load_recipe, parse_recipe, shipped_recipes
from slimc.errors import SlimcError


def built(recipe):
    return [(p.name, p.config.model_dump()) for p in recipe.build()]


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipe_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe.dump())
    again = load_recipe(path)
    assert again.to_dict() == recipe.to_dict()
    assert built(again) == built(recipe)
    assert parse_recipe(yaml.safe_load(recipe.dump()), "dump").to_dict() == recipe.to_dict()


def test_my_recipes_are_shipped():
    assert {"identity", "magnitude-20"} <= set(shipped_recipes())
    assert built(load_recipe("magnitude-20")) == [("magnitude", {"sparsity": 0.2, "multiple_of": 1})]
    assert built(load_recipe("identity")) == [("identity", {})]


def test_override_round_trips(tmp_path):
    recipe = load_recipe("magnitude-20", ["magnitude.sparsity=0.35", "magnitude.multiple_of=8"])
    path = tmp_path / "r.yaml"
    path.write_text(recipe.dump())
    assert built(load_recipe(path)) == [("magnitude", {"sparsity": 0.35, "multiple_of": 8})]


@pytest.mark.parametrize("overrides,match", [
    (["magnitude.sparsity=1.0"], "sparsity"),
    (["magnitude.bogus=1"], "unknown key 'magnitude.bogus'"),
    (["flap.sparsity=0.1"], "no pass 'flap'"),
    (["sparsity=0.1"], "pass.key=value"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(SlimcError, match=match):
        load_recipe("magnitude-20", overrides)


def test_recipe_file_with_unknown_pass(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\npasses:\n  - no_such_pass: {}\n")
    with pytest.raises(SlimcError, match="unknown pass 'no_such_pass'"):
        load_recipe(path)
