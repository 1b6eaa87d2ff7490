"""Which grammar a request's output must follow, from whichever field names it (the HTTP edge only).

Chat's `response_format` (OpenAI's), and on both endpoints vLLM's extensions: `structured_outputs`
({json | regex | choice | grammar | json_object}) and the older `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar`. At most one may be given.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenmill.grammars import GrammarCompiler, GrammarError
from tokenmill.sampling_params import GrammarSpec
from tokenmill.server.errors import clip, invalid

ANY_OBJECT = '{"type": "object"}'
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def grammar_of(request) -> tuple[str, GrammarSpec] | None:
    """The one constraint a request asks for, with the field that asked (None: unconstrained); else a 400."""
    found = [(name, spec) for name, spec in _constraints(request) if spec is not None]
    if len(found) > 1:
        names = ", ".join(f"'{name}'" for name, _ in found)
        raise invalid(f"Give at most one output constraint; this request gives {names}.", found[1][0])
    return found[0] if found else None


def compile_grammar(compiler: GrammarCompiler, constraint: tuple[str, GrammarSpec] | None) -> GrammarSpec | None:
    """Compile a request's grammar before it is queued (cached by its text): one that cannot be is a 400."""
    if constraint is None:
        return None
    param, spec = constraint
    try:
        compiler.compile(spec)
    except GrammarError as exc:
        raise invalid(f"'{param}' cannot be enforced: {clip(str(exc), 500)}", param) from None
    return spec


def _constraints(request) -> list[tuple[str, GrammarSpec | None]]:
    """Every field that can constrain the output, and the spec it gives."""
    out: list[tuple[str, GrammarSpec | None]] = []
    forced = getattr(request, "forced_tools", [])
    if forced:
        out.append(("tool_choice", GrammarSpec("json", json.dumps(tool_call_schema(forced), sort_keys=True))))
    if getattr(request, "auto_tools", False):
        options = {"calls": named_calls([t.function for t in request.tools]), "parallel": request.parallel_tool_calls is not False}
        out.append(("tools", GrammarSpec("hermes_tools", json.dumps(options, sort_keys=True))))
    fmt = getattr(request, "response_format", None)
    if fmt is not None:
        out.append(("response_format", _response_format(fmt)))
    options = request.structured_outputs
    if options is not None:
        given = [(k, v) for k, v in options.model_dump(by_alias=True).items() if v not in (None, False)]
        if len(given) != 1:
            raise invalid("'structured_outputs' takes exactly one of 'json', 'regex', 'choice', 'grammar' or 'json_object'.", "structured_outputs")
        key, value = given[0]
        out.append((f"structured_outputs.{key}", _spec(key, value, f"structured_outputs.{key}")))
    for key in ("json", "regex", "choice", "grammar"):
        value = getattr(request, f"guided_{key}")
        if value is not None:
            out.append((f"guided_{key}", _spec(key, value, f"guided_{key}")))
    return out


NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_schema(functions: list) -> dict:
    """What a forced tool call's output must be: one function's arguments, or {"name", "arguments"} for one of several."""
    if len(functions) == 1:
        return functions[0].parameters or NO_ARGUMENTS
    return named_calls(functions)


def named_calls(functions: list) -> dict:
    """A call to one of the functions: {"name": its name, "arguments": under its parameter schema}."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters or NO_ARGUMENTS},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return {"anyOf": calls}


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    """One field's value as a spec, its shape checked."""
    if kind == "json_object":
        return GrammarSpec("json", ANY_OBJECT)
    if kind == "json":
        return GrammarSpec("json", _schema_text(value, param))
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise invalid(f"'{param}' takes a non-empty array of non-empty strings.", param)
        return GrammarSpec("choice", json.dumps(value))
    if not value:
        raise invalid(f"'{param}' must not be empty.", param)
    return GrammarSpec("regex" if kind == "regex" else "grammar", value)


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema, given as an object or as JSON text, in one canonical spelling (the cache key)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise invalid(f"'{param}' is not valid JSON: {exc}.", param) from None
    if not isinstance(schema, dict | bool):
        raise invalid(f"'{param}' must be a JSON schema (an object).", param)
    return json.dumps(schema, sort_keys=True)


def _response_format(fmt: dict) -> GrammarSpec | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema {name, schema, strict, description}."""
    kind = fmt.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise invalid("Invalid value for 'response_format.type': expected 'text', 'json_object' or 'json_schema'.", "response_format.type")
    extra = next((k for k in fmt if k not in allowed[kind]), None)
    if extra is not None:
        raise invalid(f"Unrecognized request argument supplied: response_format.{clip(extra)}", f"response_format.{clip(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json", ANY_OBJECT)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema")
    extra = next((k for k in spec if k not in ("name", "schema", "strict", "description")), None)
    if extra is not None:
        name = f"response_format.json_schema.{clip(extra)}"
        raise invalid(f"Unrecognized request argument supplied: {name}", name)
    if not isinstance(spec.get("name"), str) or not SCHEMA_NAME.fullmatch(spec["name"]):
        raise invalid("'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'.", "response_format.json_schema.name")
    if spec.get("strict") not in (None, True, False) or not isinstance(spec.get("description", ""), str):
        raise invalid("'response_format.json_schema' has a mistyped 'strict' or 'description'.", "response_format.json_schema")
    # strict: false is enforced too: enforcing a schema is never wrong.
    return GrammarSpec("json", _schema_text(spec.get("schema", {}), "response_format.json_schema.schema"))
