"""Recipes: named, validated pipelines stored as YAML.

    name: flap-50
    description: FLAP, 50% of decoder attention+MLP parameters
    version: 1
    passes:
      - flap: {sparsity: 0.5}

`load_recipe` takes a shipped name (a file in `recipes/`) or a path; `--set pass.key=value`
overrides are applied before validation, so a bad value is reported like a bad file. Every pass's
options are validated by its pydantic config: an unknown key or an out-of-range value is a
`SlimcError` that lists the valid keys or the range, and names the recipe file. Recipe files are
plain YAML without anchors or aliases (`&a` / `*a`): a recipe never needs them, and refusing them
makes "billion laughs" bombs impossible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slimc.compiler.pipeline.passes import Pass, check_order, get_pass
from slimc.errors import SlimcError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"  # the package data folder slimc/recipes


@dataclass
class Recipe:
    name: str
    description: str = ""
    version: int = 1
    passes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    origin: str = ""  # the file it was read from, named in its errors ("" for a recipe built in code)

    @property
    def label(self) -> str:
        """How errors name the recipe: its name, and its file when it came from one."""
        return f"recipe '{self.name}' ({self.origin})" if self.origin and self.origin != self.name else f"recipe '{self.name}'"

    def build(self) -> list[Pass]:
        """The recipe's passes, each config validated, in an order the pipeline accepts."""
        out = []
        for pass_name, options in self.passes:
            try:
                cls = get_pass(pass_name)
            except SlimcError as e:
                raise SlimcError(f"{self.label}: {e}") from None
            try:
                out.append(cls(cls.Config(**options)))
            except ValidationError as e:
                raise SlimcError(_explain(self.label, pass_name, cls, e)) from None
        try:
            check_order(out)
        except SlimcError as e:
            raise SlimcError(f"{self.label}: {e}") from None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "passes": [{n: dict(o)} for n, o in self.passes],
        }

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _explain(recipe: str, pass_name: str, cls: type[Pass], err: ValidationError) -> str:
    fields = cls.Config.model_fields
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or pass_name
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{pass_name}.{loc}' (valid keys: {', '.join(fields) or 'none'})")
        else:
            parts.append(f"'{pass_name}.{loc}': {e['msg']}")
    return f"{recipe}: " + "; ".join(parts)


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name -> file; a duplicate name is refused."""
    out: dict[str, Path] = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        name = yaml.safe_load(path.read_text()).get("name", path.stem)
        if name in out:
            raise ValueError(f"recipe name '{name}' appears twice: {out[name]} and {path}")
        out[name] = path
    return out


def parse_recipe(data: Any, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise SlimcError(f"recipe {origin}: expected a mapping with 'name' and 'passes'")
    unknown = set(data) - {"name", "description", "version", "passes"}
    if unknown:
        raise SlimcError(f"recipe {origin}: unknown key(s) {sorted(unknown)} (valid keys: name, description, version, passes)")
    entries = data.get("passes") or []
    if not isinstance(entries, list):
        raise SlimcError(f"recipe {origin}: 'passes' must be a list of pass names or {{name: {{options}}}} entries")
    passes = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SlimcError(f"recipe {origin}: passes[{i}] must be a pass name or {{name: {{options}}}}")
        (pname, opts), = entry.items()
        if opts is not None and not isinstance(opts, dict):
            raise SlimcError(f"recipe {origin}: the options of pass '{pname}' (passes[{i}]) must be a mapping of key: value")
        passes.append((str(pname), dict(opts or {})))
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], (str, int, float)):
            raise SlimcError(f"recipe {origin}: '{key}' must be text")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SlimcError(f"recipe {origin}: 'version' must be an integer (got {version!r})")
    return Recipe(
        name=str(data.get("name", origin)),
        description=str(data.get("description", "")),
        version=version,
        passes=passes,
        origin=origin,
    )


class _AliasRefused(yaml.YAMLError):
    def __init__(self, what: str, mark):
        super().__init__(f"uses a YAML {what} at line {mark.line + 1}, column {mark.column + 1}; recipes may not "
                         "(anchors and aliases are what YAML bombs are made of)")


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases (see the module docstring)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _AliasRefused("alias (*name)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _AliasRefused("anchor (&name)", event.start_mark)
        return super().compose_node(parent, index)


MAX_RECIPE_BYTES = 1 << 20


def read_recipe_file(path: Path) -> Any:
    """The YAML document of a recipe file: UTF-8 text under 1 MB, without anchors or aliases."""
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise SlimcError(f"recipe {path}: {path.stat().st_size} bytes is far larger than any recipe; give the right file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SlimcError(f"recipe {path}: not valid YAML (the file is not UTF-8 text)") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 — a SafeLoader subclass
    except _AliasRefused as e:
        raise SlimcError(f"recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SlimcError(f"recipe {path}: not valid YAML ({' '.join(str(e).split())})") from None


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`pass.key=value` (value parsed as YAML) sets an option of every pass with that name."""
    passes = [(n, dict(o)) for n, o in recipe.passes]
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SlimcError(f"--set expects pass.key=value, got '{item}'")
        key, value = item.split("=", 1)
        pname, opt = key.split(".", 1)
        hits = [o for n, o in passes if n == pname]
        if not hits:
            raise SlimcError(f"--set {key}: {recipe.label} has no pass '{pname}' (it has: {', '.join(n for n, _ in passes)})")
        for o in hits:
            o[opt] = _parse_value(value)
    return Recipe(recipe.name, recipe.description, recipe.version, passes, recipe.origin)


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(name_or_path)
    shipped = shipped_recipes()
    if str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    elif not (path.suffix in (".yaml", ".yml") and path.is_file()):
        raise SlimcError(f"unknown recipe '{name_or_path}'; shipped recipes: {', '.join(shipped)} (or give a .yaml path)")
    data = read_recipe_file(path)
    origin = str(name_or_path) if str(name_or_path) in shipped else str(path)
    recipe = apply_overrides(parse_recipe(data, origin), overrides or [])
    recipe.build()  # validate every pass's options now, not halfway through a run
    return recipe
