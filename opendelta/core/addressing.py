"""Name-based addressing: decide whether a module's dotted name matches a user key.

Rules (as documented by OpenDelta):

* a plain key matches a name that *ends with* the key on a segment boundary:
  ``attention.out_lin`` matches ``distilbert.transformer.layer.0.attention.out_lin``,
  ``uery`` never matches ``...query``;
* a key starting with ``[r]`` is a regular expression that must match a *tail* of the
  name starting on a segment boundary: ``[r][0-5]\\.attention`` matches
  ``encoder.layer.3.attention``;
* an exclude key removes every module whose name starts with it (on a segment boundary).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, Iterable, List, Sequence, Union

Key = Union[str, "re.Pattern[str]"]

REGEX_PREFIX = "[r]"


def superstring_in(str_a: str, list_b: Iterable[str]) -> bool:
    """True if some string of ``list_b`` contains ``str_a``."""
    return any(str_a in str_b for str_b in list_b)


def is_child_key(str_a: str, list_b: Iterable[str]) -> bool:
    """True if ``str_a`` is one of ``list_b`` or lies below one of them.

    ``is_child_key("encoder.layer.0", ["encoder"])`` is True,
    ``is_child_key("encoder_2", ["encoder"])`` is False.
    """
    return any(str_a == b or str_a.startswith(b + ".") for b in list_b)


def endswith_in_normal(str_a: str, list_b: Iterable[str]) -> bool:
    """True if ``str_a`` ends with some ``b`` of ``list_b`` on a segment boundary."""
    return any(str_a == b or str_a.endswith("." + b) for b in list_b if b)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> "re.Pattern[str]":
    return re.compile(pattern)


def endswith_in_regex(str_a: str, list_b: Iterable[Key]) -> bool:
    """True if some regular expression of ``list_b`` matches a tail of ``str_a``.

    The match must end at the end of ``str_a`` and begin at its start or right after a
    ``.``, so ``attn`` does not match ``attn.c_attn``'s tail ``c_attn``. Patterns may be
    strings (with or without the ``[r]`` marker) or compiled patterns.
    """
    for b in list_b:
        pattern = b if isinstance(b, re.Pattern) else _compile(strip_regex_marker(b))
        # Try every segment start so that a tail match is found even when an earlier,
        # longer match would not end on a boundary.
        starts = [0] + [i + 1 for i, ch in enumerate(str_a) if ch == "."]
        if any(pattern.fullmatch(str_a, pos) for pos in starts):
            return True
    return False


def is_regex_key(key: Key) -> bool:
    return isinstance(key, re.Pattern) or (isinstance(key, str) and key.startswith(REGEX_PREFIX))


def strip_regex_marker(key: str) -> str:
    return key[len(REGEX_PREFIX):] if key.startswith(REGEX_PREFIX) else key


def endswith_in(str_a: str, list_b: Sequence[Key]) -> bool:
    """Match ``str_a`` against a mixed list of plain and ``[r]`` keys."""
    plain = [b for b in list_b if isinstance(b, str) and not is_regex_key(b)]
    regex = [b for b in list_b if is_regex_key(b)]
    return endswith_in_normal(str_a, plain) or endswith_in_regex(str_a, regex)


def startswith_in(str_a: str, list_b: Iterable[str]) -> bool:
    """True if ``str_a`` equals, or lies below, a name of ``list_b`` (exclusion rule)."""
    return is_child_key(str_a, list_b)


def matching_keys(name: str, keys: Sequence[Key]) -> List[Key]:
    """The keys of ``keys`` that match ``name``."""
    return [k for k in keys if endswith_in(name, [k])]


def closest_names(key: str, names: Sequence[str], limit: int = 5) -> List[str]:
    """The module names most similar to ``key``: used in error messages."""
    import difflib

    key = strip_regex_marker(key)
    # Compare against the tails of the names too, since users write suffixes.
    tails: Dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            tails.setdefault(".".join(parts[i:]), name)
    best = difflib.get_close_matches(key, list(tails), n=limit * 3, cutoff=0.5)
    out: List[str] = []
    for tail in best:
        if tail not in out:
            out.append(tail)
    return out[:limit]
