"""Find the arguments of a ``forward`` by their role, not by one spelling.

transformers renames internal arguments between releases (5.24 renamed every
``past_key_values`` to ``cache``; 5.0 passed ``cache_position``, 5.24 does not). Code
that hooks into a module's call therefore asks for a *role* and gets an
:class:`Argument`: where that role sits in the signature (name, position) and how to read
or replace its value in one call, whether the caller passed it by keyword or by position.

A role is recognised, in this order, by

1. a known spelling (:data:`SPELLINGS`, most current first);
2. the annotation (the KV cache: a parameter annotated with a ``...Cache`` class);
3. its position (the hidden states: the first parameter after ``self``).

Nothing here imports transformers; the installed version is read from the package
metadata for error messages only.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from importlib import metadata
from operator import attrgetter
from typing import Any, Dict, List, Optional, Tuple

#: transformers releases the integrations are tested with (oldest, newest).
TESTED_TRANSFORMERS: Tuple[str, str] = ("5.0.0", "5.24.0")


def _next_minor(version: str) -> str:
    """``"5.24.0"`` -> ``"5.25"``: the first release outside the tested range."""
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"

#: role -> the argument names it goes by, most current spelling first.
SPELLINGS: Dict[str, Tuple[str, ...]] = {
    "hidden": ("hidden_states", "hidden_state", "x", "inputs", "input", "query"),
    "mask": ("attention_mask", "mask", "attn_mask", "causal_mask"),
    "cache": ("cache", "past_key_values", "past_key_value", "layer_past", "past", "kv_cache"),
    "cache_position": ("cache_position", "cache_positions"),
    "position_ids": ("position_ids",),
    # the states cross-attention reads its keys and values from
    "cross": ("key_value_states", "encoder_hidden_states"),
}
_forward = attrgetter("forward")  # of a class: the plain function, its signature with self
_CACHE_ANNOTATION = re.compile(r"\b\w*Cache\b")
#: how a role is recognised besides its spellings (for error messages)
_OTHER_CLUES = {"cache": ", or a parameter annotated with a Cache class",
                "hidden": ", or a first positional parameter"}


def installed_transformers() -> str:
    """The installed transformers version (from package metadata; nothing is imported)."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "not installed"


def tested_range() -> str:
    return f"{TESTED_TRANSFORMERS[0]} - {TESTED_TRANSFORMERS[1]}"


class UnsupportedSignatureError(NotImplementedError):
    """A module's ``forward`` has no argument for a role opendelta needs."""

    def __init__(self, cls: type, role: str, user: str, detail: str = ""):
        self.cls, self.role = cls, role
        try:
            signature = str(inspect.signature(_forward(cls)))
        except (TypeError, ValueError):
            signature = "(...)"
        looked_for = ", ".join(SPELLINGS.get(role, ()))
        super().__init__(
            f"{user} cannot map {cls.__name__}.forward{signature}: it has no {role} argument "
            f"(looked for {looked_for}{detail}). Installed transformers: {installed_transformers()}; "
            f"{user} is tested with transformers {tested_range()}. Install a tested release "
            f"(pip install 'transformers>={TESTED_TRANSFORMERS[0]},<{_next_minor(TESTED_TRANSFORMERS[1])}') or "
            "report the new signature.")


@dataclass(frozen=True)
class Argument:
    """Where one role sits in a ``forward`` signature.

    Attributes:
        name: the parameter's name.
        position: its index among the positional arguments (``self`` excluded), ``None``
            for a keyword-only parameter.
        positional_only: it cannot be passed by keyword.
        defaults: defaults of the parameters before it (used to pad a positional-only call).
        aliases: other spellings of the role a caller may pass by keyword (a deprecated name
            that the module still maps, e.g. ``past_key_values`` for ``cache``).
    """

    name: str
    position: Optional[int]
    positional_only: bool = False
    defaults: Tuple[Any, ...] = ()
    aliases: Tuple[str, ...] = ()

    def key(self, kwargs: Dict[str, Any]) -> Optional[str]:
        """The keyword under which a call passes the argument (``None``: positional or absent)."""
        if self.name in kwargs:
            return self.name
        return next((alias for alias in self.aliases if alias in kwargs), None)

    def get(self, args: Tuple[Any, ...] | List[Any], kwargs: Dict[str, Any], default: Any = None) -> Any:
        """The value passed in this call, or ``default``."""
        key = self.key(kwargs)
        if key is not None:
            return kwargs[key]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        return default

    def set(self, args: List[Any], kwargs: Dict[str, Any], value: Any) -> None:
        """Pass ``value`` instead, where the caller passed the argument (in place)."""
        key = self.key(kwargs)
        if key is not None:
            kwargs[key] = value
        elif self.position is not None and self.position < len(args):
            args[self.position] = value
        elif self.positional_only:
            assert self.position is not None
            args.extend(self.defaults[len(args):self.position])
            args.append(value)
        else:
            kwargs[self.name] = value


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> Tuple[inspect.Parameter, ...]:
    parameters = tuple(inspect.signature(_forward(cls)).parameters.values())
    return parameters[1:] if parameters and parameters[0].name == "self" else parameters


def _argument(parameters: Tuple[inspect.Parameter, ...], index: int, role: str) -> Argument:
    parameter = parameters[index]
    positional = (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    position = index if parameter.kind in positional else None
    names = {p.name for p in parameters}
    aliases = tuple(s for s in SPELLINGS.get(role, ()) if s != parameter.name and s not in names)
    defaults = tuple(p.default for p in parameters[:index])
    return Argument(parameter.name, position, parameter.kind is parameter.POSITIONAL_ONLY, defaults,
                    aliases)


@functools.lru_cache(maxsize=None)
def find_argument(cls: type, role: str) -> Optional[Argument]:
    """The argument of ``cls.forward`` that plays ``role`` (a key of :data:`SPELLINGS`),
    or ``None`` when it has none. Read once per class."""
    parameters = _parameters(cls)
    named = [i for i, p in enumerate(parameters) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    by_name = {parameters[i].name: i for i in named}
    for spelling in SPELLINGS[role]:
        if spelling in by_name:
            return _argument(parameters, by_name[spelling], role)
    if role == "cache":  # a renamed cache still carries its type
        for i in named:
            annotation = parameters[i].annotation
            if annotation is not inspect.Parameter.empty and _CACHE_ANNOTATION.search(
                    annotation if isinstance(annotation, str) else repr(annotation)):
                return _argument(parameters, i, role)
    if role == "hidden" and named and parameters[named[0]].kind is not parameters[named[0]].KEYWORD_ONLY:
        return _argument(parameters, named[0], role)
    return None


def require_argument(cls: type, role: str, user: str) -> Argument:
    """:func:`find_argument`, raising :class:`UnsupportedSignatureError` (naming ``cls``,
    the installed transformers version and the tested range) when the role is missing."""
    argument = find_argument(cls, role)
    if argument is None:
        raise UnsupportedSignatureError(cls, role, user, _OTHER_CLUES.get(role, ""))
    return argument


def passed_key(cls: type, role: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """The keyword under which a call of ``cls`` made by keyword only (see
    :func:`opendelta.core.layers.call_as_kwargs`) passes ``role``: its name in the
    signature, or any spelling of the role (``**kwargs`` forwarding, deprecated names);
    ``None`` if the call does not pass it."""
    argument = find_argument(cls, role)
    if argument is not None and argument.name in kwargs:
        return argument.name
    return next((s for s in SPELLINGS[role] if kwargs.get(s) is not None), None)


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    """Positions already in a KV cache (0 for ``None``).

    Raises:
        TypeError: ``cache`` is not a transformers ``Cache`` (no ``get_seq_length``).
    """
    if cache is None:
        return 0
    get_length = getattr(cache, "get_seq_length", None)
    if get_length is None:
        raise TypeError(f"expected a transformers Cache as the cache argument, got {type(cache).__name__}")
    return int(get_length(layer_idx))
