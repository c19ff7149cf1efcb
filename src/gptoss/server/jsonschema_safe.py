"""JSON Schemas from requests, resolved only within themselves.

jsonschema's default registry fetches any `$ref` it cannot resolve locally (`file://`, `http://`),
so a client's schema could make the server read its files or call its network and quote the result
back in a validation error. Here every validator is built over a registry that retrieves nothing,
and `check_schema` walks every `$ref` of a schema up front so that an external or dangling
reference is the client's 400, named, before any generation starts.
"""

from __future__ import annotations

from typing import Any

import referencing.jsonschema
from jsonschema import Draft202012Validator, SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from jsonschema_specifications import REGISTRY as SPECIFICATIONS
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable

# The metaschemas jsonschema ships with (local, read from the package), and nothing else: the
# default `retrieve` of a `Registry` refuses every URI.
_LOCAL = SPECIFICATIONS.combine(Registry())

REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


class UnsafeSchemaError(ValueError):
    """A schema that is invalid, or refers to something outside itself."""


def validator(schema: dict[str, Any]) -> Validator:
    """A validator for `schema` whose references can never leave it."""
    cls = validator_for(schema, default=Draft202012Validator)
    return cls(schema, registry=_LOCAL)


def check_schema(schema: dict[str, Any]) -> None:
    """Raise `UnsafeSchemaError` unless `schema` is a valid JSON Schema whose every reference
    resolves within itself (or to a metaschema)."""
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise UnsafeSchemaError(f"not a valid JSON Schema: {exc.message}") from None
    except RecursionError:
        raise UnsafeSchemaError("the JSON Schema is nested too deeply") from None
    specification = referencing.jsonschema.specification_with(
        cls.META_SCHEMA.get("$schema", ""), default=referencing.jsonschema.DRAFT202012
    )
    root = Resource.from_contents(schema, default_specification=specification)
    resolver = _LOCAL.resolver_with_root(root)
    try:
        _check_refs(root, resolver)
    except RecursionError:
        raise UnsafeSchemaError("the JSON Schema is nested too deeply") from None


def _check_refs(resource: Resource[Any], resolver: referencing.Resolver[Any]) -> None:
    resolver = resolver.in_subresource(resource)
    contents = resource.contents
    if isinstance(contents, dict):
        for keyword in REF_KEYWORDS:
            ref = contents.get(keyword)
            if not isinstance(ref, str):
                continue
            try:
                resolver.lookup(ref)
            except Unresolvable:
                raise UnsafeSchemaError(
                    f"the JSON Schema's {keyword} {ref!r} does not resolve within the schema; "
                    "this server never fetches schemas from files or URLs, so put the referenced "
                    "schema under $defs and refer to it as '#/$defs/NAME'"
                ) from None
    for sub in resource.subresources():
        _check_refs(sub, resolver)
