"""JSON Schema validation against the schemas shipped in onnxsparse/schemas/."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

from onnxsparse.errors import UsageError

SCHEMA_DIR = Path(__file__).parent / "schemas"


@cache
def load_schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def validate(instance: object, schema_name: str, where: str) -> None:
    """Raise UsageError naming `where` and the offending field when `instance` breaks the schema."""
    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "top level"
        raise UsageError(f"{where}: {field}: {error.message}")
