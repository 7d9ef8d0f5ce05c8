"""Matching a key against a *run* of whole segments anywhere in a module name.

The engine matches name *tails* (:mod:`opendelta.core.addressing`); these helpers, which
the OpenDelta manual documents under ``opendelta.utils.name_based_addressing``, match a
run of segments anywhere: ``layer.10`` is inside ``encoder.layer.10.attention``, ``ayer``
is not.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from .addressing import Key, is_regex_key, strip_regex_marker


def substring_in_normal(str_a: str, list_b: Iterable[str]) -> bool:
    """True if some ``b`` of ``list_b`` is a run of whole segments of ``str_a``.

    ``substring_in_normal("encoder.layer.0.attention.self", ["layer.0"])`` is True,
    ``substring_in_normal("encoder.layer.0", ["ayer"])`` is False.
    """
    segments = str_a.split(".")
    for b in list_b:
        wanted = b.split(".")
        n = len(wanted)
        if any(segments[i:i + n] == wanted for i in range(len(segments) - n + 1)):
            return True
    return False


def substring_in_regex(str_a: str, list_b: Iterable[Key]) -> bool:
    """True if some regular expression of ``list_b`` matches a run of whole segments of
    ``str_a`` (the match starts and ends on a ``.`` boundary). Patterns may be compiled or
    strings (with or without the ``[r]`` marker)."""
    starts = [0] + [i + 1 for i, ch in enumerate(str_a) if ch == "."]
    ends = [i for i, ch in enumerate(str_a) if ch == "."] + [len(str_a)]
    for b in list_b:
        pattern = b if isinstance(b, re.Pattern) else re.compile(strip_regex_marker(b))
        if any(pattern.fullmatch(str_a, s, e) for s in starts for e in ends if e > s):
            return True
    return False


def substring_in(str_a: str, list_b: Sequence[Key]) -> bool:
    """:func:`substring_in_normal` for plain keys and :func:`substring_in_regex` for
    ``[r]`` keys and compiled patterns of a mixed ``list_b``."""
    plain = [b for b in list_b if isinstance(b, str) and not is_regex_key(b)]
    regex = [b for b in list_b if is_regex_key(b)]
    return substring_in_normal(str_a, plain) or substring_in_regex(str_a, regex)


__all__ = ["substring_in", "substring_in_normal", "substring_in_regex"]
