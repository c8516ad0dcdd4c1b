"""pydantic's validation errors as hive words them: one (field, sentence) pair per bad field.

The API's 422 (:func:`hive.api.middleware.validation_message`), a configuration file's errors
(:func:`hive.config.parse_config`), ``hive spawn``'s checks before it sends and ``hive serve
--listen``'s all come from here, so that a person reads the same sentence everywhere: the field,
then what it must be (``id: must be 1-63 lowercase letters, ...``), never a regular expression
or the name pydantic gives a union's arm.
"""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

#: The names pydantic gives the arms of a union in an error's location (``int``, ``list[int]``,
#: ``function-before[...]``, ``literal['optional']``...): they say which arm failed, not which
#: field.
_TYPE_TAG = re.compile(
    r"^(constrained-\w+|function-\w+(\[.*\])?|(list|dict|tuple|set|frozenset|literal)\[.*\]"
    r"|int|str|float|bool|bytes|none)$"
)

#: A model validator's message that starts with the field it is about (``default_backend: ...``).
_LEADING_FIELD = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.+)$", re.DOTALL)

#: Fields whose every error (but a validator's own sentence) says the same: what is allowed.
#: Keyed by the field with its list indices left out, so that ``cpus.0`` is ``cpus``.
FIELD_SENTENCES: dict[str, str] = {
    "id": (
        "must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    "device": "must be auto, cpu, gpu, CPU-<n>, GPU-<n> or a GPU UUID",
    "cpus": "must be a count of at least 1, or a list of core ids",
}


#: Error kinds that keep their own words even on a field of :data:`FIELD_SENTENCES`: a
#: validator's sentence, a missing field, an unknown key.
_OWN_WORDS = frozenset({"value_error", "assertion_error", "missing", "extra_forbidden"})


def _number(value: Any) -> str:
    """``0.0`` as ``0``, ``1.5`` as ``1.5``: bounds as a person writes them."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _characters(n: Any) -> str:
    return f"{n} character" if n == 1 else f"{n} characters"


def _items(n: Any) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def sentence(error: ErrorDetails) -> str:
    """What one pydantic error asks for, in words: ``must be at least 1``, ``is required``..."""
    kind, ctx = error["type"], error.get("ctx") or {}
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    match kind:
        case "value_error" | "assertion_error":
            return message
        case "missing":
            return "is required"
        case "extra_forbidden":
            return "unknown key"
        case "greater_than_equal":
            return f"must be at least {_number(ctx['ge'])}"
        case "greater_than":
            return f"must be more than {_number(ctx['gt'])}"
        case "less_than_equal":
            return f"must be at most {_number(ctx['le'])}"
        case "less_than":
            return f"must be less than {_number(ctx['lt'])}"
        case "int_parsing" | "int_type" | "int_from_float":
            return "must be a whole number"
        case "float_parsing" | "float_type":
            return "must be a number"
        case "bool_parsing" | "bool_type":
            return "must be true or false"
        case "string_type":
            return "must be a string"
        case "string_too_short":
            n = ctx.get("min_length", 1)
            return "must not be empty" if n == 1 else f"must be at least {_characters(n)}"
        case "string_too_long":
            return f"must be at most {_characters(ctx.get('max_length'))}"
        case "too_short":
            return f"must have at least {_items(ctx.get('min_length'))}"
        case "too_long":
            return f"must have at most {_items(ctx.get('max_length'))}"
        case "list_type" | "tuple_type" | "set_type":
            return "must be a list"
        case "dict_type" | "model_type" | "model_attributes_type":
            return "must be a table of names and values"
        case "literal_error" | "enum":
            return f"must be {ctx.get('expected', 'one of the allowed values')}"
        case "string_pattern_mismatch":
            return f"must match the pattern {ctx.get('pattern')}"
        case "path_type":
            return "must be a path"
        case "json_invalid" | "json_type":
            return "must be valid JSON"
        case _:
            return message


def field_errors(
    exc: ValidationError,
    *,
    top: str,
    drop_type_tags: bool = True,
    model: type[BaseModel] | None = None,
    unknown_first: bool = False,
) -> list[tuple[str, str]]:
    """Each bad field of ``exc``, in order, as (dotted field, sentence).

    The field is ``top`` for an error about the whole input, unless its message starts with the
    field (``bootstrap_port: ...``). Errors on the same field (the arms of a union) become one
    sentence. With ``drop_type_tags`` (the default) the field leaves out the names of union
    arms, so that ``cpus`` is ``cpus`` and not ``cpus.list[...]``. With ``model`` (the model
    that was validated), an unknown key comes with the nearest known one: ``did you mean``.
    With ``unknown_first``, unknown keys come first: for a caller that says only the first
    error, ``modl = "m"`` is the typo to fix, not the ``model`` it left out.
    """
    merged: dict[str, list[str]] = {}
    unknown: set[str] = set()
    for item in exc.errors():
        parts = [str(p) for p in item["loc"]]
        if drop_type_tags:
            parts = [p for p in parts if not _TYPE_TAG.match(p)]
        message = sentence(item)
        field = ".".join(parts)
        if not field and (leading := _LEADING_FIELD.match(message)):
            field, message = leading.group(1), leading.group(2)
        general = ".".join(p for p in parts if not p.isdigit())
        if general in FIELD_SENTENCES and item["type"] not in _OWN_WORDS:
            field, message = general, FIELD_SENTENCES[general]
        elif item["type"] == "extra_forbidden" and model is not None and parts:
            message += _suggestion(parts[-1], _known_keys(model, parts[:-1]))
        if item["type"] == "extra_forbidden":
            unknown.add(field or top)
        merged.setdefault(field or top, [])
        if message not in merged[field or top]:
            merged[field or top].append(message)
    ordered = list(merged.items())
    if unknown_first:
        ordered.sort(key=lambda pair: pair[0] not in unknown)
    return [(field, _join(field, messages)) for field, messages in ordered]


def _join(field: str, messages: list[str]) -> str:
    """One sentence for a field that several arms of a union refused."""
    if FIELD_SENTENCES.get(field) in messages:
        return FIELD_SENTENCES[field]
    if len(messages) > 1 and all(m.startswith("must be ") for m in messages):
        return "must be " + ", or ".join(m.removeprefix("must be ") for m in messages)
    return "; ".join(messages)


def _suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys the table at ``path`` (field names and dict keys, as in an error's location)
    may have, found by walking ``model``'s annotations; none where the walk loses its way."""
    current: Any = model
    for part in path:
        current = _step(current, part)
        if current is None:
            return []
    target = _model_of(current)
    if target is None:
        return []
    return [info.alias or name for name, info in target.model_fields.items()]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in _arms(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _arms(annotation: Any) -> list[Any]:
    """The types an annotation may be: itself, or each arm of a union (Annotated unwrapped)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [arm for a in get_args(annotation) for arm in _arms(a)]
    return [annotation]


def _step(annotation: Any, part: str) -> Any:
    for arm in _arms(annotation):
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            for name, info in arm.model_fields.items():
                if part in (name, info.alias):
                    return info.annotation
            continue
        origin, args = get_origin(arm), get_args(arm)
        if origin in (list, tuple, set, frozenset) and args and part.isdigit():
            return args[0]
        if origin is dict and len(args) == 2:
            return args[1]
    return None
