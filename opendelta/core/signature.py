"""Argument names of functions (documented at ``opendelta.utils.signature``).

The documented use is a configuration class (or a delta model) whose ``__init__`` stores
its own arguments without naming them twice::

    class MyConfig(BaseDeltaConfig):
        def __init__(self, my_rank=4, my_scale=1.0, **kwargs):
            super().__init__(**kwargs)
            for arg_name in get_arg_names_inside_func(self.__init__):
                if not hasattr(self, arg_name):
                    setattr(self, arg_name, locals()[arg_name])
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, List, NamedTuple, Optional, Tuple


class Signature(NamedTuple):
    """What :func:`signature` returns: the positional-or-keyword argument names, their
    default values (``None`` if none has one), and the names of ``*args`` and ``**kwargs``
    (``None`` when absent)."""

    args: List[str]
    defaults: Optional[List[Any]]
    varargs: Optional[str]
    keywords: Optional[str]


def signature(f: Callable[..., Any]) -> Signature:
    """The input arguments of ``f``.

    Args:
        f: a function, method (bound: without ``self``; unbound: with it) or class.

    Returns:
        ``Signature(args, defaults, varargs, keywords)``: ``args`` are the
        positional-or-keyword parameter names in order, ``defaults`` the defaults of those
        that have one (in order, ``None`` when none has one), ``varargs`` / ``keywords``
        the names of ``*args`` / ``**kwargs`` or ``None``.

    Raises:
        TypeError: ``f`` is not callable or has no inspectable signature.
    """
    if not callable(f):
        raise TypeError(f"signature() needs a callable, got {type(f).__name__}")
    try:
        params = list(inspect.signature(f).parameters.values())
    except ValueError as err:  # builtins without a text signature
        raise TypeError(f"cannot read the signature of {f!r}: {err}") from None
    kinds = inspect.Parameter
    args = [p.name for p in params if p.kind is kinds.POSITIONAL_OR_KEYWORD]
    defaults = [p.default for p in params
                if p.kind is kinds.POSITIONAL_OR_KEYWORD and p.default is not p.empty] or None
    varargs = next((p.name for p in params if p.kind is kinds.VAR_POSITIONAL), None)
    keywords = next((p.name for p in params if p.kind is kinds.VAR_KEYWORD), None)
    return Signature(args, defaults, varargs, keywords)


def get_arg_names(f: Callable[..., Any]) -> List[str]:
    """The positional-or-keyword argument names of ``f``, without a leading ``self``.

    ``get_arg_names(LoraModel.__init__)`` is ``["backbone_model", "modified_modules", ...]``.
    """
    args = signature(f).args
    return args[1:] if args and args[0] == "self" else args


def get_arg_names_inside_func(func: Callable[..., Any]) -> Tuple[str, ...]:
    """The argument names of ``func`` read from its code object, without ``self``.

    Meant to be called inside ``func`` itself (``get_arg_names_inside_func(self.__init__)``)
    together with ``locals()``. Named positional arguments come first, then keyword-only
    ones; ``*args`` and ``**kwargs`` are not included.

    When a subclass overrides the method, ``self.__init__`` is the subclass's; called from
    the parent's ``__init__`` on the same object, the names of the *calling* ``__init__``
    are returned, so that ``locals()[name]`` finds them there too.

    Raises:
        TypeError: ``func`` has no Python code object (a builtin or a C function).
    """
    code = getattr(func, "__code__", None)
    if code is None:
        raise TypeError(f"get_arg_names_inside_func needs a Python function or method, got {func!r}")
    bound_to = getattr(func, "__self__", None)
    caller = sys._getframe(1).f_code
    if bound_to is not None and caller is not code and caller.co_name == code.co_name \
            and caller.co_argcount and _first_local(sys._getframe(1)) is bound_to:
        code = caller  # the parent's method, running on the same object
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    return names[1:] if names and names[0] == "self" else names


def _first_local(frame: Any) -> Any:
    return frame.f_locals.get(frame.f_code.co_varnames[0])


__all__ = ["Signature", "signature", "get_arg_names", "get_arg_names_inside_func"]
