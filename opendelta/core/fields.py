"""Declared validation of configuration fields: one rule per field, stated where the field is.

A configuration field declares its type, range and finiteness once, with :func:`validated`::

    @dataclass
    class LoraConfig(BaseDeltaConfig):
        lora_r: int = validated(8, integer(minimum=1))
        lora_alpha: float = validated(16, number())                       # finite
        lora_dropout: float = validated(0.0, number(minimum=0, maximum=1, exclusive_maximum=True))

The rule runs whenever a config is built: from constructor arguments, from ``from_dict`` /
``config.json`` and on ``copy``. A value that breaks it raises :class:`ConfigFieldError`
(a ``TypeError`` *and* a ``ValueError``) naming the config, the field, the value and the
rule; loaders turn it into a :class:`~opendelta.io.files.CheckpointError` naming the file.
``bool`` is never accepted where an integer or a number is asked for (``True`` is not a
rank), and numbers are finite unless the rule says ``finite=False``.

Configs written by hand (the manual's ``__init__`` pattern, no dataclass) declare rules in
a class attribute ``field_rules = {"my_rank": integer(minimum=1)}``; they are checked when
the config goes through ``from_dict`` / ``copy`` (every delta model copies its config).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

#: key of a dataclass field's metadata holding its :class:`Rule`.
RULE_KEY = "opendelta_rule"


class ConfigFieldError(TypeError, ValueError):
    """A configuration field holds a value its rule refuses.

    Both a ``TypeError`` and a ``ValueError``, so code written against either keeps working.

    Attributes:
        owner: name of the config class.
        field: the field (``modified_modules[1]`` for an entry of a list).
        value: the refused value.
        rule: what the field accepts, in words.
    """

    def __init__(self, owner: str, field: str, value: Any, rule: str, note: str = "", typed: bool = True):
        self.owner, self.field, self.value, self.rule = owner, field, value, rule
        shown = f"{value!r} ({type(value).__name__})" if typed and value is not None else repr(value)
        super().__init__(f"{owner}.{field} must be {rule}, got {shown}{note}")


class ChoiceError(ConfigFieldError):
    """A field that names one of a fixed set of options got an unknown name."""

    def __init__(self, owner: str, field: str, value: Any, rule: str):
        ConfigFieldError.__init__(self, owner, field, value, rule)
        self.args = (f"unknown {field} {value!r}: {owner}.{field} must be {rule}",)


@dataclass(frozen=True)
class Rule:
    """What one field accepts. Build rules with :func:`integer`, :func:`number`,
    :func:`boolean`, :func:`text`, :func:`string_list` and :func:`mapping`.

    Attributes:
        kind: ``"int"``, ``"number"``, ``"bool"``, ``"str"``, ``"list"`` or ``"mapping"``.
        minimum / maximum: bounds of numbers (inclusive unless ``exclusive_*``).
        finite: numbers must be finite (no NaN, no inf).
        choices: the accepted strings (``case_insensitive`` compares lower-cased).
        nullable: ``None`` is accepted.
        items: the rule of each list entry or mapping value.
        allow_bool: a ``bool`` counts as a number (mapping values such as mask fills).
    """

    kind: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    finite: bool = True
    choices: Optional[Tuple[str, ...]] = None
    case_insensitive: bool = False
    nullable: bool = False
    items: Optional["Rule"] = None
    allow_bool: bool = False

    # ------------------------------------------------------------------ words
    def _interval(self) -> str:
        lo = "(" if self.exclusive_minimum else "["
        hi = ")" if self.exclusive_maximum else "]"
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{lo}{low}, {high}{hi}"

    def describe(self) -> str:
        """The rule in words (used in error messages)."""
        if self.kind == "int":
            if self.minimum == 1 and self.maximum is None:
                text = "a positive integer"
            elif self.minimum == 0 and self.maximum is None:
                text = "a non-negative integer"
            elif self.minimum is None and self.maximum is None:
                text = "an integer"
            else:
                text = f"an integer in {self._interval()}"
        elif self.kind == "number":
            what = "a finite number" if self.finite else "a number"
            if self.minimum == 0 and self.exclusive_minimum and self.maximum is None:
                text = "a positive" + what[1:]
            elif self.minimum is None and self.maximum is None:
                text = what
            else:
                text = f"in {self._interval()} ({what})"
        elif self.kind == "bool":
            text = "True or False"
        elif self.kind == "str":
            text = f"one of {list(self.choices)}" if self.choices else "a string"
            if self.choices and self.case_insensitive:
                text += " (case-insensitive)"
        elif self.kind == "list":
            text = "a list of strings" if self.items is not None and self.items.kind == "str" \
                else "a list"
        elif self.kind == "mapping":
            text = "a mapping of names to " + (self.items.describe() if self.items else "values")
        else:  # pragma: no cover - rules are built by the helpers below
            text = self.kind
        return text + (" or None" if self.nullable else "")

    # ------------------------------------------------------------------ checking
    def check(self, owner: str, field: str, value: Any) -> None:
        """Raise :class:`ConfigFieldError` if ``value`` breaks this rule."""
        if value is None:
            if not self.nullable:
                raise ConfigFieldError(owner, field, value, self.describe())
            return
        kind = self.kind
        if kind in ("int", "number"):
            self._check_number(owner, field, value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ConfigFieldError(owner, field, value, self.describe())
        elif kind == "str":
            if not isinstance(value, str):
                raise ConfigFieldError(owner, field, value, self.describe())
            if self.choices is not None:
                seen = value.lower() if self.case_insensitive else value
                options = [c.lower() for c in self.choices] if self.case_insensitive else list(self.choices)
                if seen not in options:
                    raise ChoiceError(owner, field, value, self.describe())
        elif kind == "list":
            if isinstance(value, str):
                raise ConfigFieldError(owner, field, value, self.describe(),
                                       f"; a bare string is not a list: write [{value!r}]")
            if not isinstance(value, (list, tuple)):
                raise ConfigFieldError(owner, field, value, self.describe())
            if self.items is not None:
                for i, entry in enumerate(value):
                    self.items.check(owner, f"{field}[{i}]", entry)
        elif kind == "mapping":
            if not isinstance(value, dict):
                raise ConfigFieldError(owner, field, value, self.describe())
            for key, entry in value.items():
                if not isinstance(key, str):
                    raise ConfigFieldError(owner, f"{field} key", key, "a string")
                if self.items is not None:
                    self.items.check(owner, f"{field}[{key!r}]", entry)

    def _check_number(self, owner: str, field: str, value: Any) -> None:
        is_bool = isinstance(value, bool)
        wanted = numbers.Integral if self.kind == "int" else numbers.Real
        if (is_bool and not self.allow_bool) or not isinstance(value, wanted):
            note = "; a bool is not a number here" if is_bool else ""
            raise ConfigFieldError(owner, field, value, self.describe(), note)
        rule = self.describe()
        value = float(value) if not isinstance(value, numbers.Integral) else int(value)
        if self.finite and not math.isfinite(value):
            raise ConfigFieldError(owner, field, value, rule, typed=False)
        if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            raise ConfigFieldError(owner, field, value, rule, typed=False)
        if self.maximum is not None and (value > self.maximum or (self.exclusive_maximum and value == self.maximum)):
            raise ConfigFieldError(owner, field, value, rule, typed=False)


# --------------------------------------------------------------------------- rule builders
def integer(minimum: Optional[int] = None, maximum: Optional[int] = None, nullable: bool = False) -> Rule:
    """An ``int`` (never a ``bool``) in ``[minimum, maximum]``."""
    return Rule("int", minimum=minimum, maximum=maximum, nullable=nullable)


def number(minimum: Optional[float] = None, maximum: Optional[float] = None, *,
           exclusive_minimum: bool = False, exclusive_maximum: bool = False, finite: bool = True,
           nullable: bool = False, allow_bool: bool = False) -> Rule:
    """An ``int`` or ``float`` (never a ``bool`` unless ``allow_bool``), finite by default."""
    return Rule("number", minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum,
                exclusive_maximum=exclusive_maximum, finite=finite, nullable=nullable, allow_bool=allow_bool)


def boolean(nullable: bool = False) -> Rule:
    """``True`` or ``False`` (not ``0`` / ``1``)."""
    return Rule("bool", nullable=nullable)


def text(choices: Optional[Sequence[str]] = None, case_insensitive: bool = False, nullable: bool = False) -> Rule:
    """A string, optionally one of ``choices``."""
    return Rule("str", choices=tuple(choices) if choices is not None else None,
                case_insensitive=case_insensitive, nullable=nullable)


def string_list(nullable: bool = True) -> Rule:
    """A list (or tuple) of strings; a bare string is refused with the fix in the message."""
    return Rule("list", items=text(), nullable=nullable)


def mapping(values: Optional[Rule] = None) -> Rule:
    """A dict with string keys whose values follow ``values``."""
    return Rule("mapping", items=values)


def validated(default: Any = dataclasses.MISSING, rule: Optional[Rule] = None, *,
              default_factory: Any = dataclasses.MISSING, **field_kwargs: Any) -> Any:
    """A dataclass field carrying ``rule``: ``lora_r: int = validated(8, integer(minimum=1))``.
    Use ``default_factory=`` for mutable defaults."""
    if rule is None:
        raise TypeError("validated() needs a rule, e.g. validated(8, integer(minimum=1))")
    metadata = {**field_kwargs.pop("metadata", {}), RULE_KEY: rule}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, **field_kwargs)
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


def rules_of(cls: type) -> Dict[str, Rule]:
    """Every declared rule of a config class: its dataclass fields' rules, then the
    ``field_rules`` class attributes of the hierarchy (a subclass's win)."""
    out: Dict[str, Rule] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            rule = f.metadata.get(RULE_KEY)
            if isinstance(rule, Rule):
                out[f.name] = rule
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("field_rules") or {})
    return out


def check_fields(config: Any, only_present: bool = False) -> None:
    """Check every declared field of ``config`` (an attribute not yet set is skipped when
    ``only_present``); raises :class:`ConfigFieldError` at the first broken rule."""
    owner = type(config).__name__
    for name, rule in rules_of(type(config)).items():
        if only_present and name not in vars(config):
            continue
        rule.check(owner, name, getattr(config, name, None))


def check_mapping(cls: type, values: Dict[str, Any]) -> None:
    """Check the entries of ``values`` (e.g. a ``config.json`` dict) that ``cls`` declares
    rules for, before anything reads them."""
    rules = rules_of(cls)
    for name, value in values.items():
        rule = rules.get(name)
        if rule is not None:
            rule.check(cls.__name__, name, value)


__all__ = ["ConfigFieldError", "ChoiceError", "Rule", "integer", "number", "boolean", "text", "string_list",
           "mapping", "validated", "rules_of", "check_fields", "check_mapping", "RULE_KEY"]
