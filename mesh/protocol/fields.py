"""What a header field may hold: the `Limits` every decoder enforces, `spec(...)` bounds on a
message field, and the checkers derived from a field's type hint.

A checker takes (value from the msgpack header, dotted path for errors, limits) and returns the
value to build the message with (tuples from msgpack arrays, floats from ints), or raises
MalformedFrame / OversizedMessage naming the field, what it got and what it expected. Types
understood: str, int, float, bool, Literal[...], dict, dict[str, X], list[X], tuple[X, Y],
a NamedTuple (sent as a msgpack array, rebuilt as that NamedTuple), X | None. Ints are ints (not
bools), floats are finite.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union

from mesh.errors import MalformedFrame, OversizedMessage, ProtocolError

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Limits:
    """Upper bounds a decoder enforces before it reads anything. Units in the names.

    max_header_bytes:      header frame of most messages
    max_big_header_bytes:  header frame of messages with `BIG_HEADER = True` (prompts, reports:
                           GenerateRequest, RequestDone, StatusReply, NodeHeartbeat,
                           MetricsSnapshot)
    max_frames:            frames in one message (type + header + tensors)
    max_tensor_bytes:      one tensor frame (the coordinator splits far below it, at
                           policy.payload_cap_bytes)
    max_tensor_ndim:       rank of one tensor
    max_str_len:           characters in a string field (ids, codes, messages, paths)
    max_prompt_len:        characters in a prompt
    max_list_len:          items in a list field
    max_prompt_tokens:     items in GenerateRequest.prompt_ids
    max_map_len:           entries in any one map inside a header
    max_depth:             nesting of maps and lists inside a free-form map field (record,
                           status, payload), so that printing one cannot overflow the stack
    """

    max_header_bytes: int = 64 * KiB
    max_big_header_bytes: int = 8 * MiB
    max_frames: int = 16
    max_tensor_bytes: int = 64 * MiB
    max_tensor_ndim: int = 8
    max_str_len: int = 16 * KiB
    max_prompt_len: int = 1 * MiB
    max_list_len: int = 65_536
    max_prompt_tokens: int = 262_144
    max_map_len: int = 65_536
    max_depth: int = 32

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{f.name}: expected an int >= 1, got {value!r}")


DEFAULT_LIMITS = Limits()
_LIMIT_NAMES = frozenset(f.name for f in dataclasses.fields(Limits))


def spec(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    max_len: str | None = None,
    dtypes: tuple[str, ...] | None = None,
    ndim: int | None = None,
) -> Any:
    """A message field with wire bounds (used like `dataclasses.field`).

    ge / gt / le: numeric bounds; on a list, tuple or map of numbers they bound each item
    max_len:      name of the `Limits` attribute bounding this str or list
                  (default "max_str_len" / "max_list_len")
    dtypes:       tensor fields: dtype names accepted (default: every wire dtype)
    ndim:         tensor fields: the required rank
    """
    if max_len is not None and max_len not in _LIMIT_NAMES:
        raise TypeError(f"spec(max_len={max_len!r}): not a Limits field")
    bounds = {"ge": ge, "gt": gt, "le": le, "max_len": max_len, "dtypes": dtypes, "ndim": ndim}
    metadata = {key: value for key, value in bounds.items() if value is not None}
    if default is MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


Checker = Callable[[Any, str, "Limits"], Any]


_SHORT = reprlib.Repr()  # (keyword arguments need Python 3.12)
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 3, 40, 40, 6, 6


def show(value: Any) -> str:
    """A short description of a received value for error messages: `type repr`, bounded in
    length and depth (a hostile header may nest 1000 levels deep)."""
    return f"{type(value).__name__} {_SHORT.repr(value)}"


def bad(path: str, expected: str, value: Any) -> MalformedFrame:
    """The error for a field that does not hold what its type says."""
    return MalformedFrame(f"{path}: expected {expected}, got {show(value)}", field=path)


def too_many(path: str, what: str, count: int, limit_name: str, limits: Limits) -> OversizedMessage:
    """The error for a string, list or map beyond its Limits bound."""
    limit = getattr(limits, limit_name)
    return OversizedMessage(
        f"{path}: {count} {what}; at most {limit} (Limits.{limit_name})", field=path
    )


def checker(hint: Any, meta: dict[str, Any]) -> tuple[Checker, str]:
    """The checker for a field's type hint and `spec` metadata, and its 'expected ...' words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return _check_bool, "bool"
    if hint is int or hint is float:
        return _number_checker(hint, meta)
    if hint is str:
        return _str_checker(meta.get("max_len", "max_str_len"))
    if origin is Literal:
        return _choice_checker(args)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner_hint,) = [a for a in args if a is not type(None)]
        return _optional_checker(*checker(inner_hint, meta))
    if hint is dict or origin is dict:
        value_hint = args[1] if args else Any
        return _map_checker(None if value_hint is Any else checker(value_hint, meta))
    if origin is list:
        return _list_checker(*checker(args[0], meta), meta.get("max_len", "max_list_len"))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return _tuple_checker([checker(a, meta) for a in args])
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
        return _named_tuple_checker(hint, meta)
    raise TypeError(f"no wire checker for type hint {hint!r}; add one to mesh.protocol.fields")


def _check_bool(value: Any, path: str, limits: Limits) -> Any:
    if type(value) is not bool:
        raise bad(path, "bool", value)
    return value


def _number_checker(kind: type, meta: dict[str, Any]) -> tuple[Checker, str]:
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    words = ["int" if kind is int else "finite number"]
    words += [f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le)) if b is not None]
    expected = " ".join(words)
    is_float = kind is float

    def check(value: Any, path: str, limits: Limits) -> Any:
        if is_float:
            ok = (type(value) is float or type(value) is int) and math.isfinite(value)
        else:
            ok = type(value) is int
        if (
            not ok
            or (ge is not None and value < ge)
            or (gt is not None and value <= gt)
            or (le is not None and value > le)
        ):
            raise bad(path, expected, value)
        return float(value) if is_float else value

    return check, expected


def _str_checker(limit_name: str) -> tuple[Checker, str]:
    def check(value: Any, path: str, limits: Limits) -> Any:
        if type(value) is not str:
            raise bad(path, "str", value)
        if len(value) > getattr(limits, limit_name):
            raise too_many(path, "characters", len(value), limit_name, limits)
        return value

    return check, "str"


def _choice_checker(choices: tuple[Any, ...]) -> tuple[Checker, str]:
    expected = "one of " + ", ".join(repr(c) for c in choices)
    choice_types = {type(c) for c in choices}

    def check(value: Any, path: str, limits: Limits) -> Any:
        if type(value) not in choice_types or value not in choices:
            raise bad(path, expected, value)
        return value

    return check, expected


def _optional_checker(inner: Checker, inner_expected: str) -> tuple[Checker, str]:
    expected = f"{inner_expected} or nil"

    def check(value: Any, path: str, limits: Limits) -> Any:
        if value is None:
            return None
        try:
            return inner(value, path, limits)
        except MalformedFrame as exc:
            if (
                exc.field == path
            ):  # the value itself is wrong (not an item inside it): say nil works
                raise bad(path, expected, value) from None
            raise

    return check, expected


def _map_checker(values: tuple[Checker, str] | None) -> tuple[Checker, str]:
    """A map with str keys; its values checked only when the hint says what they are."""
    expected = "map" if values is None else f"map of str to {values[1]}"

    def check(value: Any, path: str, limits: Limits) -> Any:
        if type(value) is not dict:
            raise bad(path, expected, value)
        if len(value) > limits.max_map_len:
            raise too_many(path, "entries", len(value), "max_map_len", limits)
        if values is None:
            if _depth(value, limits.max_depth) > limits.max_depth:
                raise OversizedMessage(
                    f"{path}: nested deeper than {limits.max_depth} levels (Limits.max_depth)",
                    field=path,
                )
            return value
        for key in value:
            if type(key) is not str:
                raise bad(f"{path} key", "str", key)
        value_check = values[0]
        try:
            return {key: value_check(item, path, limits) for key, item in value.items()}
        except ProtocolError:  # check again, naming the entry (paths are built on failure only)
            for key, item in value.items():
                value_check(item, f"{path}[{key!r}]", limits)
            raise

    return check, expected


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of maps and lists in `value` (1 for a flat map), counted up to limit + 1.
    Iterative: the value may be nested far deeper than Python's recursion limit."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            children = item.values()
        elif type(item) is list:
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _list_checker(item_check: Checker, item_expected: str, limit_name: str) -> tuple[Checker, str]:
    expected = f"list of {item_expected}"

    def check(value: Any, path: str, limits: Limits) -> Any:
        if type(value) is not list:
            raise bad(path, expected, value)
        if len(value) > getattr(limits, limit_name):
            raise too_many(path, "items", len(value), limit_name, limits)
        try:
            return [item_check(item, path, limits) for item in value]
        except ProtocolError:  # check again, naming the item (paths are built on failure only)
            for i, item in enumerate(value):
                item_check(item, f"{path}[{i}]", limits)
            raise

    return check, expected


def _tuple_checker(items: list[tuple[Checker, str]]) -> tuple[Checker, str]:
    """A fixed-length tuple, sent as a msgpack array and rebuilt as a tuple."""
    expected = "[" + ", ".join(words for _, words in items) + "]"

    def check(value: Any, path: str, limits: Limits) -> Any:
        if type(value) is not list or len(value) != len(items):
            raise bad(path, expected, value)
        try:
            return tuple(
                item_check(item, path, limits) for item, (item_check, _) in zip(value, items)
            )
        except ProtocolError:  # check again, naming the item
            for i, (item, (item_check, _)) in enumerate(zip(value, items)):
                item_check(item, f"{path}[{i}]", limits)
            raise

    return check, expected


def _named_tuple_checker(cls: type, meta: dict[str, Any]) -> tuple[Checker, str]:
    """A NamedTuple: its items checked as a fixed-length tuple of its annotations (the field's
    `spec` bounds apply to each numeric item), rebuilt as `cls`."""
    hints = typing.get_type_hints(cls)
    check_items, expected = _tuple_checker([checker(hints[name], meta) for name in cls._fields])
    expected = f"{cls.__name__} {expected}"

    def check(value: Any, path: str, limits: Limits) -> Any:
        try:
            return cls(*check_items(value, path, limits))
        except MalformedFrame as exc:
            if exc.field == path:  # the value itself is wrong: say what the tuple holds
                raise bad(path, expected, value) from None
            raise

    return check, expected
