"""The lock of one compatibility environment, derived from constraints.txt (used by compat.sh).

Run with the throwaway environment's Python, which has ``packaging`` and the transformers
release under test installed (``pip install --no-deps transformers==X``)::

    python scripts/compat_lock.py derive constraints.txt OUT [NAME==VERSION ...]
        Write OUT: the lock without transformers' pin, without every pin that the installed
        transformers' own requirements exclude (e.g. 5.0.0 needs huggingface_hub<2 and
        tokenizers<=0.23.0: pip then picks those within transformers' range), and with each
        NAME==VERSION argument replacing the lock's pin of NAME. Prints what it changed.
    python scripts/compat_lock.py report constraints.txt
        Print the installed versions that differ from the lock and warn when the installed
        transformers lies outside the range opendelta declares.
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import Dict, List, Tuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

TRANSFORMERS = "transformers"


def read_lock(path: str) -> Dict[str, Tuple[str, str]]:
    """``{canonical name: (line as written, pinned version)}`` of a ``name==version`` file."""
    pins: Dict[str, Tuple[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            specs = list(req.specifier)
            if len(specs) != 1 or specs[0].operator != "==":
                raise SystemExit(f"{path}: {line!r} is not a NAME==VERSION pin")
            pins[canonicalize_name(req.name)] = (line, specs[0].version)
    return pins


def requirements(dist: str, extra: str = "") -> List[Requirement]:
    """The requirements of an installed distribution that apply here, with ``extra`` if given."""
    reqs = [Requirement(r) for r in metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra})]


def derive(lock_path: str, out_path: str, overrides: List[str]) -> None:
    pins = read_lock(lock_path)
    version = metadata.version(TRANSFORMERS)
    changes = [f"transformers: {pins.pop(TRANSFORMERS, ('', 'unpinned'))[1]} -> {version}"]
    for req in requirements(TRANSFORMERS):
        name = canonicalize_name(req.name)
        if name in pins and not req.specifier.contains(pins[name][1], prereleases=True):
            changes.append(f"{name}: lock {pins.pop(name)[1]} excluded by transformers "
                           f"{version} ({req.specifier}); pip picks one in that range")
    for spec in overrides:
        req = Requirement(spec)
        if len(req.specifier) != 1 or next(iter(req.specifier)).operator != "==":
            raise SystemExit(f"--with {spec!r}: give NAME==VERSION")
        name = canonicalize_name(req.name)
        old = pins[name][1] if name in pins else "unpinned"
        pins[name] = (spec, next(iter(req.specifier)).version)
        changes.append(f"{name}: {old} -> {pins[name][1]} (--with)")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(f"# {lock_path} for transformers {version}, written by scripts/compat_lock.py\n")
        f.write("".join(line + "\n" for line, _ in pins.values()))
    print("lock changes: " + "; ".join(changes))


def report(lock_path: str) -> None:
    pins = read_lock(lock_path)
    differ = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and Version(dist.version).public != Version(pins[name][1]).public:
            differ.append(f"{name} {dist.version} (lock {pins[name][1]})")
    print("installed versions that differ from the lock: " + (", ".join(sorted(differ)) or "none"))
    installed = metadata.version(TRANSFORMERS)
    for req in requirements("opendelta", extra="full"):
        if canonicalize_name(req.name) == TRANSFORMERS and not req.specifier.contains(installed, prereleases=True):
            print(f"warning: transformers {installed} is outside the range opendelta declares "
                  f"({req.specifier}); testing it anyway")
            break


def main(argv: List[str]) -> None:
    if len(argv) >= 3 and argv[0] == "derive":
        derive(argv[1], argv[2], argv[3:])
    elif len(argv) == 2 and argv[0] == "report":
        report(argv[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
