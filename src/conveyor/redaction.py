"""Redaction: argument fields named as secret never show in what Conveyor prints or logs.

``Conveyor(redact=("password", "token"))``, ``$CONVEYOR_REDACT="password,token"`` (added to the
app's) and ``@app.task(redact=["card_number"])`` name argument fields. A field is a keyword
argument, or a key of a dict at any depth inside the arguments, or a parameter of the task's
function passed positionally; names match case-insensitively. Then, for that task's jobs:

* ``conveyor jobs show`` / ``jobs list`` (text and ``--json``) print ``"[redacted]"`` for the
  value of every such field (in args, kwargs and the result), and
* every error message and traceback the worker stores or logs has each such value's text
  (strings and numbers of at least :data:`MIN_SCRUB_LENGTH` characters, also as they appear
  escaped in JSON or in a Python repr) replaced by ``"[redacted]"``; the CLI scrubs stored
  errors again when it prints them.

Positional arguments are matched to parameter names where the task is registered (workers, and
the CLI with ``--app``); the CLI without ``--app`` cannot match them, so when any field is
redacted it shows every positional argument as ``"[redacted]"``.

The job's stored arguments keep the real values: the task needs them. Redaction covers what
Conveyor itself prints; what a task logs on its own is the task's business.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

#: What a redacted value is replaced with.
REDACTED = "[redacted]"
#: Comma-separated field names redacted by every app of the process (added to ``redact=``).
ENV_REDACT = "CONVEYOR_REDACT"
#: Shorter values are hidden in arguments but not searched for in error text (where a 1-3
#: character "secret" would garble every message without protecting anything).
MIN_SCRUB_LENGTH = 4


def check_fields(where: str, value: object) -> frozenset[str]:
    """Field names from a list of strings (or one comma-separated string), lower-cased."""
    if value is None:
        return frozenset()
    items: Iterable[object]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        raise ConfigurationError(
            f"{where}: redact={value!r} must be a list of argument field names"
        )
    names = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError(
                f"{where}: redact field {item!r} must be a non-empty string (a field name)"
            )
        names.add(item.strip().casefold())
    return frozenset(names)


def env_fields() -> frozenset[str]:
    """The field names of ``$CONVEYOR_REDACT``."""
    text = os.environ.get(ENV_REDACT, "")
    return check_fields(f"${ENV_REDACT}", [p for p in text.split(",") if p.strip()])


@dataclass(frozen=True)
class Redaction:
    """What to hide in one task's jobs: field ``names`` and, from the task function's signature,
    the ``positions`` of positional arguments that are such fields. Where the task is unknown
    (the CLI without ``--app``), no position can be matched to a name: ``all_positions`` then
    hides every positional argument (they are not searched for in error text, which the worker
    already scrubbed knowing the task)."""

    names: frozenset[str] = frozenset()
    positions: tuple[int, ...] = ()
    all_positions: bool = False

    def __bool__(self) -> bool:
        return bool(self.names or self.positions or self.all_positions)

    @classmethod
    def for_function(cls, names: frozenset[str], fn: Callable[..., Any] | None) -> Redaction:
        positions: tuple[int, ...] = ()
        if names and fn is not None:
            try:
                params = list(inspect.signature(fn).parameters.values())
            except (TypeError, ValueError):  # a builtin without a signature
                params = []
            kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            positions = tuple(
                i for i, p in enumerate(params) if p.kind in kinds and p.name.casefold() in names
            )
        return cls(names, positions)

    # -- values ---------------------------------------------------------------------------------
    def args(self, args: Any) -> Any:
        """``args`` with every redacted field (and redacted position) replaced."""
        if not self or not isinstance(args, list):
            return args
        return [
            REDACTED if self.all_positions or i in self.positions else redact(item, self.names)
            for i, item in enumerate(args)
        ]

    def value(self, value: Any) -> Any:
        """``value`` (kwargs, a result) with every redacted field's value replaced."""
        return redact(value, self.names) if self.names else value

    def secrets(self, args: Any, kwargs: Any) -> list[str]:
        """The texts to scrub from error messages: every redacted value of these arguments as
        text (also JSON- and repr-escaped), longest first."""
        if not self:
            return []
        found: set[str] = set()
        if isinstance(args, list):
            for i, item in enumerate(args):
                if i in self.positions:
                    found.update(_texts(item))
                else:
                    found.update(_secrets(item, self.names))
        found.update(_secrets(kwargs, self.names))
        variants: set[str] = set()
        for text in found:
            if len(text) < MIN_SCRUB_LENGTH:
                continue
            variants.add(text)
            variants.add(json.dumps(text, ensure_ascii=False)[1:-1])
            variants.add(json.dumps(text)[1:-1])
            variants.add(repr(text)[1:-1])
        return sorted((v for v in variants if len(v) >= MIN_SCRUB_LENGTH), key=len, reverse=True)

    def scrubber(self, args: Any, kwargs: Any) -> Callable[[str], str]:
        """A function replacing this job's redacted values in a text (identity if none)."""
        secrets = self.secrets(args, kwargs)
        if not secrets:
            return _same
        return lambda text: scrub(text, secrets)


def _same(text: str) -> str:
    return text


def redact(value: Any, names: frozenset[str]) -> Any:
    """A copy of ``value`` with the value of every dict key in ``names`` (any depth) replaced."""
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and k.casefold() in names else redact(v, names)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, names) for v in value]
    return value


def _secrets(value: Any, names: frozenset[str]) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.casefold() in names:
                yield from _texts(v)
            else:
                yield from _secrets(v, names)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _secrets(v, names)


def _texts(value: Any) -> Iterator[str]:
    """Every scalar inside ``value`` as text (a whole list or dict under a secret field is
    secret)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, str):
        yield value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield str(value)
        yield json.dumps(value)


def scrub_error(error: Any, clean: Callable[[str], str]) -> Any:
    """An error entry (kind, message, traceback, ...) with ``clean`` (a scrubber) applied to its
    texts."""
    if not isinstance(error, dict):
        return error
    return {k: clean(v) if isinstance(v, str) else v for k, v in error.items()}


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every occurrence of each secret (longest first) replaced by REDACTED."""
    if not isinstance(text, str):
        return text
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
