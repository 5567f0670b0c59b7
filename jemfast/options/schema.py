"""Options declared once, on dataclass fields: flag, help, bounds and choices.

A field declared with :func:`option` carries its command-line flag and its rules in
``field.metadata``; from them this module

- checks a value and normalises it to plain Python types (:func:`check_field`,
  :func:`check_fields`): numpy/torch scalars become ``int``/``float``/``bool``, sequences become
  tuples, so a checkpoint never carries a foreign type;
- adds the flags to an ``argparse`` parser (:func:`add_flags`) and reads back the ones given
  (:func:`given_values`);
- writes values back as flags (:func:`to_argv`), for printed commands.

Errors are ``ValueError`` (:class:`OptionError`) whose text starts with the flag:
``--sgld-steps (sampler.n_steps): must be >= 1, got 0``. Rules (metadata keys): ``lo``/``hi``
(inclusive bounds), ``gt``/``lt`` (exclusive bounds), ``choices``, ``check`` (a function returning
a problem or None), ``min_len`` (sequences), ``unique``/``sort`` (sequences), ``action``
(``store_true``/``store_false`` switches, ``append`` for a repeatable flag of a sequence).
Bounds and choices of a sequence apply to each item.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import types
import typing
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..process.errors import one_line

# The rules an option may carry (besides flag/help/action/metavar).
RULES = ("lo", "hi", "gt", "lt", "choices", "check", "min_len", "unique", "sort")


class OptionError(ValueError):
    """A bad option value; ``str()`` is ``"<label>: <problem>"``."""

    def __init__(self, label: str, problem: str, key: str = "") -> None:
        super().__init__(f"{label}: {problem}")
        self.label, self.problem, self.key = label, problem, key


def option(default: Any = dataclasses.MISSING, flag: str | None = None, help: str = "", *,
           default_factory: Any = dataclasses.MISSING, action: str | None = None,
           metavar: str | None = None, group: str | None = None, **rules: Any) -> Any:
    """A dataclass field with a flag and rules (see the module docstring for the rule names).
    ``group`` names the ``--help`` section the flag is listed in."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise TypeError(f"option(): unknown rule(s) {sorted(unknown)}")
    meta = {"flag": flag, "help": help, "action": action, "metavar": metavar, "group": group, **rules}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- types ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kind:
    """A field's type, read from its annotation: ``base`` is int/float/str/bool (or None for
    anything else), ``seq`` says ``tuple[base, ...]``, ``optional`` says ``... | None``."""

    base: type | None
    seq: bool = False
    optional: bool = False

    @property
    def name(self) -> str:
        base = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
            self.base, "a value") if self.base else "a value"
        return f"a list of {base.split(' ', 1)[-1]}s" if self.seq else base


def _kind(tp: Any) -> Kind:
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else Any
        args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        base = args[0]
        return Kind(base if base in (int, float, str, bool) else None, True, optional)
    return Kind(tp if tp in (int, float, str, bool) else None, False, optional)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@lru_cache(maxsize=None)
def kinds(cls: type) -> dict[str, Kind]:
    """``{field name: Kind}`` of a dataclass (annotations resolved once)."""
    return {f.name: _kind(_hints(cls)[f.name]) for f in dataclasses.fields(cls)}


def declared(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Kind]]:
    """``(dotted key, field, kind)`` of every option of ``cls``, nested dataclasses included."""
    for f in dataclasses.fields(cls):
        sub = _nested(cls, f)
        if sub is not None:
            yield from declared(sub, f"{prefix}{f.name}.")
        elif "flag" in f.metadata:
            yield f"{prefix}{f.name}", f, kinds(cls)[f.name]


def _nested(cls: type, f: dataclasses.Field) -> type | None:
    tp = _hints(cls)[f.name]
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


# ---- checking ---------------------------------------------------------------------------------
def show(value: Any) -> str:
    """A value as quoted in a message: repr (control characters escaped), huge numbers short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 20:
        exp = math.log10(abs(value))  # exact enough for ints too large for a float
        return f"{'-' if value < 0 else ''}{10 ** (exp % 1):.3g}e+{int(exp)}"
    return one_line(repr(value), 80)


def _plain(value: Any) -> Any:
    """numpy/torch scalars and arrays -> Python scalars and lists (duck-typed: ``tolist``)."""
    if not isinstance(value, (str, bytes, bool, int, float)) and callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value


def _scalar(value: Any, base: type | None) -> tuple[Any, str | None]:
    """(normalised value, problem or None) for one scalar of type ``base``."""
    value = _plain(value)
    if base is None:
        return value, None
    if base is bool:
        return (value, None) if isinstance(value, bool) else (value, f"must be true or false, got {show(value)}")
    if base is str:
        return (value, None) if isinstance(value, str) else (value, f"must be a string, got {show(value)}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value, f"must be {'an integer' if base is int else 'a number'}, got {show(value)}"
    if base is int:
        if isinstance(value, numbers.Integral):
            return int(value), None
        f = float(value)
        if not math.isfinite(f):
            return value, f"must be a finite integer, got {show(value)}"
        return (int(f), None) if f.is_integer() else (value, f"must be an integer, got {show(value)}")
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    return (f, None) if math.isfinite(f) else (value, f"must be a finite number, got {show(value)}")


def _fmt(x: Any) -> str:
    return str(x) if not isinstance(x, float) or not x.is_integer() or abs(x) >= 1e16 else str(int(x))


def _rule_problem(meta: Mapping[str, Any], v: Any) -> str | None:
    """The first broken bound/choice rule for one (normalised) item, or None."""
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        return f"must be one of {', '.join(map(str, choices))}; got {show(v)}"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        for key, ok, word in (("lo", lambda b: v >= b, ">="), ("gt", lambda b: v > b, ">"),
                              ("hi", lambda b: v <= b, "<="), ("lt", lambda b: v < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(bound):
                return f"must be {word} {_fmt(bound)}, got {show(v)}"
    check: Callable[[Any], str | None] | None = meta.get("check")
    return check(v) if check is not None else None


def check_field(meta: Mapping[str, Any], kind: Kind, value: Any, label: str, key: str = "") -> Any:
    """``value`` normalised to plain Python types and checked against ``meta``'s rules.

    Raises :class:`OptionError` ``"<label>: <problem>"``."""
    def fail(problem: str) -> OptionError:
        return OptionError(label, problem, key)

    if value is None:
        if kind.optional:
            return None
        raise fail(f"must be {kind.name}, got None")
    if not kind.seq:
        value, problem = _scalar(value, kind.base)
        problem = problem or _rule_problem(meta, value)
        if problem:
            raise fail(problem)
        return value
    value = _plain(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise fail(f"must be {kind.name}, got {show(value)}")
    items = []
    for item in value:
        item, problem = _scalar(item, kind.base)
        problem = problem or _rule_problem(meta, item)
        if problem:
            raise fail(f"each item {problem}")
        items.append(item)
    if meta.get("unique"):
        items = list(dict.fromkeys(items))
    if meta.get("sort"):
        items = sorted(set(items))
    if len(items) < meta.get("min_len", 0):
        raise fail("must list at least one item" if meta["min_len"] == 1 else
                   f"must list at least {meta['min_len']} items, got {len(items)}")
    return tuple(items)


def label_of(key: str, f: dataclasses.Field, nested: bool) -> str:
    """How messages name a field: its flag, plus the dotted field for nested configs."""
    flag = f.metadata.get("flag")
    if not flag:
        return key
    return f"{flag} ({key})" if nested else flag


def check_fields(obj: Any, prefix: str = "") -> Any:
    """Check and normalise, in place, every option of dataclass instance ``obj`` (nested ones
    included); raises :class:`OptionError` naming the first bad one. Returns ``obj``."""
    cls = type(obj)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if _nested(cls, f) is not None:
            if not isinstance(value, _nested(cls, f)):
                raise OptionError(f"{prefix}{f.name}", f"must be a {_nested(cls, f).__name__}, got {show(value)}")
            check_fields(value, f"{prefix}{f.name}.")
        elif "flag" in f.metadata:
            key = f"{prefix}{f.name}"
            setattr(obj, f.name, check_field(f.metadata, kinds(cls)[f.name], value,
                                             label_of(key, f, bool(prefix)), key))
    return obj


# ---- argparse ---------------------------------------------------------------------------------
def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _list_parser(base: type | None) -> Callable[[str], tuple]:
    item = {int: int, float: float, bool: parse_bool}.get(base, str)  # type: ignore[arg-type]

    def parse(text: str) -> tuple:
        try:
            return tuple(item(t) for t in text.replace(" ", ",").split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list like '1,2', got {text!r}") from None

    parse.__name__ = f"{getattr(base, '__name__', 'str')} list"
    return parse


def _help(meta: Mapping[str, Any], f: dataclasses.Field, kind: Kind) -> str:
    rules = []
    lo, hi = meta.get("lo", meta.get("gt")), meta.get("hi", meta.get("lt"))
    if lo is not None or hi is not None:
        left, right = "[" if "lo" in meta else "(", "]" if "hi" in meta else ")"
        rules.append(f"in {left}{_fmt(lo) if lo is not None else '-inf'}, "
                     f"{_fmt(hi) if hi is not None else 'inf'}{right}")
    d = f.default
    if meta.get("action") is None and d is not dataclasses.MISSING and d is not None:
        rules.append("default " + (",".join(map(str, d)) if isinstance(d, tuple) else str(d).lower()
                                   if isinstance(d, bool) else str(d)))
    text = meta.get("help") or ""
    return f"{text} ({'; '.join(rules)})" if rules else text


def _metavar(key: str, meta: Mapping[str, Any], kind: Kind) -> str:
    if meta.get("metavar"):
        return meta["metavar"]
    if meta.get("choices") is not None:
        return "{" + ",".join(map(str, meta["choices"])) + "}"
    word = {int: "N", float: "X", bool: "BOOL"}.get(kind.base, key.rsplit(".", 1)[-1].upper())  # type: ignore
    return f"{word},..." if kind.seq and meta.get("action") != "append" else word


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (), dest_prefix: str = "",
              group: Any = None) -> None:
    """Add one flag per option of ``cls`` to ``parser``: into ``group`` (an argument group) if
    given, else into the group an option names (made on first use), else the parser itself.

    Flags default to ``argparse.SUPPRESS``: only flags given appear in the namespace, under
    ``dest_prefix + dotted key``. A field without a default is a required flag."""
    groups: dict[str, Any] = {}
    for key, f, kind in declared(cls):
        meta = f.metadata
        if not meta.get("flag") or key in skip:
            continue
        kw: dict[str, Any] = {"dest": dest_prefix + key, "help": _help(meta, f, kind), "default": argparse.SUPPRESS}
        if meta.get("action") in ("store_true", "store_false"):
            kw["action"] = meta["action"]
        else:
            if meta.get("action") == "append":
                kw["action"], kw["type"] = "append", kind.base or str
            else:
                kw["type"] = (_list_parser(kind.base) if kind.seq else
                              parse_bool if kind.base is bool else kind.base or str)
            kw["metavar"] = _metavar(key, meta, kind)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kw["required"] = True
        target = group
        if target is None and meta.get("group"):
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                    parser.add_argument_group(meta["group"]))
        (target or parser).add_argument(meta["flag"], **kw)


def given_values(args: argparse.Namespace, cls: type, dest_prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of the flags of ``cls`` (added by :func:`add_flags`) that were given."""
    given = vars(args)
    return {key: given[dest_prefix + key] for key, _, _ in declared(cls) if dest_prefix + key in given}


def to_argv(cls: type, values: Mapping[str, Any]) -> list[str]:
    """``{dotted key: value}`` written back as flags of ``cls`` (inverse of parsing)."""
    fields = {key: f for key, f, _ in declared(cls)}
    argv: list[str] = []
    for key, v in values.items():
        meta = fields[key].metadata
        if meta.get("action") == "store_true":
            argv += [meta["flag"]] if v else []
        elif meta.get("action") == "store_false":
            argv += [] if v else [meta["flag"]]
        elif isinstance(v, (tuple, list)) and meta.get("action") == "append":
            argv += [tok for item in v for tok in (meta["flag"], str(item))]
        elif isinstance(v, (tuple, list)):
            argv += [meta["flag"], ",".join(map(str, v))]
        else:
            argv += [meta["flag"], str(v).lower() if isinstance(v, bool) else str(v)]
    return argv
