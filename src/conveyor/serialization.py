"""JSON only, never pickle: job arguments and results are checked before they reach the database.

Errors name the path of the offending value (``args[1]['when']``) so the caller can fix it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InvalidArgumentsError

#: Default limit on the encoded size of a job's arguments and of its result.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentsError(f"{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentsError(
                    f"{path} has key {key!r} of type {type(key).__name__}; JSON object keys must be str"
                )
            _check(item, f"{path}[{key!r}]")
        return
    raise InvalidArgumentsError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__} ({_short(value)}), "
        "which is not JSON-serializable; pass str, int, float, bool, None, list or dict"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dumps(value: Any, path: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode ``value`` as compact JSON, or raise :class:`InvalidArgumentsError` naming ``path``."""
    _check(value, path)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidArgumentsError(
            f"{path} is {size} bytes as JSON, over the limit of {max_bytes}"
        )
    return text
