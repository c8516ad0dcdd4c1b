"""pydantic's validation errors as hive words them: one (field, message) pair per error.

The API's 422 (:func:`hive.api.middleware.validation_message`), a configuration file's errors
(:func:`hive.config.parse_config`) and ``hive serve --listen``'s all come from here.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

#: The names pydantic gives the arms of a union in an error's location (``int``, ``list[int]``,
#: ``function-after[...]``...): they say which arm failed, not which field.
_TYPE_TAG = re.compile(
    r"^(constrained-\w+|function-\w+|(list|dict|tuple)\[.*\]|int|str|float|bool)$"
)


def field_errors(
    exc: ValidationError, *, top: str, drop_type_tags: bool = False
) -> list[tuple[str, str]]:
    """Each error of ``exc``, in order, as (dotted field, message).

    The field is ``top`` for an error about the whole input. The message is pydantic's without
    its ``Value error, `` prefix. With ``drop_type_tags`` the field leaves out the names of
    union arms, so that ``cpus`` is ``cpus`` and not ``cpus.list[...]``.
    """
    errors: list[tuple[str, str]] = []
    for item in exc.errors():
        parts = [str(p) for p in item["loc"]]
        if drop_type_tags:
            parts = [p for p in parts if not _TYPE_TAG.match(p)]
        errors.append((".".join(parts) or top, item["msg"].removeprefix("Value error, ")))
    return errors
