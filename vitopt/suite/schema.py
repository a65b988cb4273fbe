"""A small validator for the subset of JSON Schema the suite's record schema uses.

jsonschema is not a dependency, so this checks: `type` (a name or a list of names: object,
array, string, number, integer, boolean, null), `properties`, `required`,
`additionalProperties` (false or a schema), `items`, `enum`, `minimum`, `minItems` and `$ref`
to `#/definitions/NAME`. Any other keyword in the schema is refused, so the schema cannot use
something this validator silently ignores.

    errors = validate(document, schema)     # [] when valid; else "path: what is wrong" lines
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Union

from vitopt.errors import ConfigError

SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "enum",
             "minimum", "minItems", "$ref", "description", "title", "$schema", "$id",
             "definitions"}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def load_schema(path: Union[str, Path]) -> dict:
    schema = json.loads(Path(path).read_text())
    _check_keywords(schema, "#")
    return schema


def _check_keywords(schema, where: str) -> None:
    if not isinstance(schema, dict):
        raise ConfigError(f"schema at {where} must be an object, got {schema!r}")
    unknown = set(schema) - SUPPORTED
    if "$ref" in schema and set(schema) - {"$ref", "description"}:
        raise ConfigError(f"schema at {where}: $ref must stand alone (the validator follows it "
                          f"and ignores siblings)")
    if unknown:
        raise ConfigError(f"schema at {where} uses {', '.join(sorted(unknown))}, which "
                          f"vitopt.suite.schema does not check; supported: {', '.join(sorted(SUPPORTED))}")
    for name, sub in schema.get("properties", {}).items():
        _check_keywords(sub, f"{where}/properties/{name}")
    for name, sub in schema.get("definitions", {}).items():
        _check_keywords(sub, f"{where}/definitions/{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _check_keywords(schema[key], f"{where}/{key}")


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name not in _TYPES:
        raise ConfigError(f"unknown JSON Schema type {name!r}")
    return isinstance(value, _TYPES[name])


def validate(document, schema: dict, root: dict = None, path: str = "$") -> List[str]:
    """All violations of `schema` in `document` as 'path: message' strings."""
    root = root if root is not None else schema
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/definitions/"):
            raise ConfigError(f"only local #/definitions/ references are supported, got {ref!r}")
        return validate(document, root["definitions"][ref.split("/")[-1]], root, path)
    errors: List[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(document, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(document).__name__} "
                    f"{json.dumps(document)[:60]}"]
    if "enum" in schema and document not in schema["enum"]:
        errors.append(f"{path}: {document!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(document, "number") and document < schema["minimum"]:
        errors.append(f"{path}: {document} is below the minimum {schema['minimum']}")
    if isinstance(document, dict):
        errors += _validate_object(document, schema, root, path)
    if isinstance(document, list):
        if len(document) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(document)} items, at least {schema['minItems']} needed")
        if "items" in schema:
            for index, item in enumerate(document):
                errors += validate(item, schema["items"], root, f"{path}[{index}]")
    return errors


def _validate_object(document: dict, schema: dict, root: dict, path: str) -> List[str]:
    errors = [f"{path}: missing required key {key!r}" for key in schema.get("required", [])
              if key not in document]
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, value in document.items():
        if key in properties:
            errors += validate(value, properties[key], root, f"{path}.{key}")
        elif extra is False:
            errors.append(f"{path}: unexpected key {key!r}")
        elif isinstance(extra, dict):
            errors += validate(value, extra, root, f"{path}.{key}")
    return errors
