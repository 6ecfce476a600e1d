"""JSON only, never pickle: job arguments and results are checked before they reach the database.

Errors name the path of the offending value (``args[1]['when']``) so the caller can fix it. What
is refused, on both backends alike: values JSON cannot represent (objects, sets, bytes, NaN,
infinities, non-str keys), payloads over the size limit (``Conveyor(max_payload_bytes=...)``,
1 MiB by default), nesting deeper than :data:`MAX_DEPTH` (or a list that contains itself),
integers of more than :data:`MAX_INT_DIGITS` digits (no reader could decode them), and text with
a NUL character or a lone surrogate (PostgreSQL's jsonb and UTF-8 cannot store them).

Reading is the other way round: :func:`load_stored` never raises. A stored value that cannot be
decoded (a row corrupted in the database, or written by another program) comes back as an
:class:`UnreadableJSON`, so one bad row cannot break a claim, a list or a worker; a job whose
arguments are unreadable ends dead ("unusable arguments") instead of running.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentsError

#: Default limit on the encoded size of a job's arguments and of its result.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
#: Deepest nesting of lists and dicts accepted in arguments and results.
MAX_DEPTH = 128
#: Longest integer accepted, in decimal digits: Python's own limit on converting an int from
#: text (``sys.int_info.default_max_str_digits``), so every worker can read what was stored.
MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**MAX_INT_DIGITS
_INT_BITS = 14_000  # every int under 2**14000 has fewer than 4300 digits: the fast path


def _check(value: Any, path: str, depth: int) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidArgumentsError(
                f"{path} contains a NUL character ('\\x00'), which PostgreSQL cannot store in "
                "JSON; remove it or encode the text (e.g. base64)"
            )
        return
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if value.bit_length() > _INT_BITS and abs(value) >= _INT_LIMIT:
            raise InvalidArgumentsError(
                f"{path} is an integer of more than {MAX_INT_DIGITS} digits, which JSON readers "
                "refuse; pass it as a string"
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentsError(f"{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, list | tuple | dict) and depth >= MAX_DEPTH:
        where = path if len(path) <= 80 else f"{path[:40]}...{path[-20:]}"
        raise InvalidArgumentsError(
            f"{where} is nested more than {MAX_DEPTH} lists or dicts deep (or contains itself)"
        )
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentsError(
                    f"{path} has key {key!r} of type {type(key).__name__}; JSON object keys must be str"
                )
            if "\x00" in key:
                raise InvalidArgumentsError(
                    f"{path} has key {key!r} with a NUL character ('\\x00'), which PostgreSQL "
                    "cannot store in JSON"
                )
            _check(item, f"{path}[{key!r}]", depth + 1)
        return
    raise InvalidArgumentsError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__} ({_short(value)}), "
        "which is not JSON-serializable; pass str, int, float, bool, None, list or dict"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _find_text(value: Any, path: str, bad: Callable[[str], bool]) -> str | None:
    """The path of the first string (value or key) in ``value`` for which ``bad`` is true."""
    if isinstance(value, str):
        return path if bad(value) else None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (found := _find_text(item, f"{path}[{i}]", bad)) is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            if bad(key):
                return f"{path} key {key!r}"
            if (found := _find_text(item, f"{path}[{key!r}]", bad)) is not None:
                return found
    return None


def _flat_and_valid(items: Any) -> bool:
    """Whether ``items`` (a list's or tuple's elements, a dict's values) are all scalars that
    :func:`_check` would accept: the common case, checked without a call per element."""
    for v in items:
        kind = type(v)
        if kind is str:
            if "\x00" in v:
                return False
        elif kind is int:
            if v.bit_length() > _INT_BITS:
                return False
        elif kind is float:
            if not math.isfinite(v):
                return False
        elif v is not None and kind is not bool:
            return False
    return True


def _checked_fast(value: Any) -> bool:
    """True if ``value`` is a list, tuple or dict (str keys) of valid scalars, so that
    :func:`_check` can be skipped; False means: run the full check."""
    kind = type(value)
    if kind is list or kind is tuple:
        return _flat_and_valid(value)
    if kind is dict:
        return all(type(k) is str and "\x00" not in k for k in value) and _flat_and_valid(
            value.values()
        )
    return False


#: The C encoder, built once (json.dumps builds one per call): compact, UTF-8 as is, no NaN.
#: No circular-reference check: _check has refused anything nested 128 deep (or cyclic) first.
_encode = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None,
    json.JSONEncoder().default,
    json.encoder.c_encode_basestring,  # type: ignore[attr-defined]
    None,
    ":",
    ",",
    False,
    False,
    False,
)


_EMPTY: dict[type, str] = {list: "[]", tuple: "[]", dict: "{}"}


def dumps(value: Any, path: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode ``value`` as compact JSON, or raise :class:`InvalidArgumentsError` naming ``path``."""
    if not value and type(value) in _EMPTY:  # no arguments, the most common case
        return _EMPTY[type(value)]
    if not _checked_fast(value):
        _check(value, path, 0)
    text = "".join(_encode(value, 0))
    try:
        size = len(text) if text.isascii() else len(text.encode())
    except UnicodeEncodeError:
        where = _find_text(value, path, lambda s: not _utf8(s)) or path
        raise InvalidArgumentsError(
            f"{where} is not valid Unicode text (it holds a lone surrogate such as '\\ud800'), "
            "which cannot be stored as UTF-8 JSON"
        ) from None
    if size > max_bytes:
        raise InvalidArgumentsError(
            f"{path} is {size} bytes as JSON, over the limit of {max_bytes}"
        )
    return text


@dataclass(frozen=True)
class UnreadableJSON:
    """A stored JSON value that could not be decoded, in place of the value: ``reason`` says why,
    ``text`` is the start of what was stored. Shown without its text (it may hold a secret)."""

    text: str
    reason: str

    def __str__(self) -> str:
        return f"<unreadable JSON: {self.reason}>"

    __repr__ = __str__


_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def load_text(text: str, start: int = 0) -> Any:
    """:func:`load_stored` for a ``str`` holding one JSON value from ``start`` on (PostgreSQL's
    binary jsonb has a version byte first), through the C scanner directly: about half the cost
    of ``json.loads``, on the hot path of every claimed job. Anything unusual (whitespace around
    the value, invalid JSON) takes the ``json.loads`` path, which says what is wrong."""
    try:
        value, end = _scan_once(text, start)
    except (StopIteration, ValueError, RecursionError):
        return load_stored(text[start:])
    return value if end == len(text) else load_stored(text[start:])


def load_stored(data: str | bytes | bytearray | memoryview) -> Any:
    """Decode a JSON column as stored; an :class:`UnreadableJSON` instead of raising, so one
    corrupted row cannot break a claim or a listing (backends decode every JSON column here)."""
    raw = bytes(data) if isinstance(data, memoryview) else data
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        text = raw if isinstance(raw, str) else bytes(raw).decode(errors="replace")
        reason = str(exc) if isinstance(exc, ValueError) else "nested too deep to decode"
        return UnreadableJSON(text[:200], reason.splitlines()[0][:200] if reason else "invalid")
