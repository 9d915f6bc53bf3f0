"""Per-layer pruning recipes (YAML), validated against schemas/recipe.schema.json."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from onnxsparse.errors import UsageError
from onnxsparse.validation import validate


@dataclass(frozen=True)
class Rule:
    """Settings for the layers whose node or weight name `match` finds; None fields inherit."""

    match: str
    pattern: str | None = None
    sparsity: float | None = None
    criterion: str | None = None

    def matches(self, *names: str) -> bool:
        return any(re.search(self.match, name) for name in names)


@dataclass(frozen=True)
class Recipe:
    defaults: Rule
    rules: tuple[Rule, ...]

    def rule_for(self, *names: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(*names)), None)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the recipe ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return recipe_from_dict(document if document is not None else {}, where=str(path))


def recipe_from_dict(document: dict, where: str = "recipe") -> Recipe:
    validate(document, "recipe", where)
    rules = tuple(Rule(**entry) for entry in document.get("layers", []))
    for number, rule in enumerate(rules, 1):
        try:
            re.compile(rule.match)
        except re.error as exc:
            raise UsageError(f"{where}: layers[{number - 1}]: match {rule.match!r} is not a valid regex ({exc})") from exc
    return Recipe(Rule(match="", **document.get("defaults", {})), rules)
