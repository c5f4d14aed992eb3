"""The dependency lock (`requirements.lock`): is it current, and does this environment match it.

`make lock` resolves `pyproject.toml` (plus the build requirements) with uv into exact
versions and hashes and writes the sha256 of the dependency spec it resolved into the
lock's first line. `make setup` runs `check` before it installs anything, so a lock that
no longer matches `pyproject.toml` is a one-line error instead of a silent install of the
old set. At run time `environment()` goes into every manifest: the lock's hash and the
installed packages that differ from it, so two adapters trained under different
environments can be told apart.

Standard library only: `make setup` runs this file with the system Python before the
virtualenv exists (`python3 retroloop/envlock.py check`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

LOCK_NAME = "requirements.lock"
HEADER = "# pyproject-deps-sha256: "
# What `make lock` adds to the project's own requirements: the build backend, so the
# editable install of retroloop itself (`--no-build-isolation`) resolves nothing new.
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
ROOT = Path(__file__).resolve().parent.parent


def spec_sha256(pyproject: Path) -> str:
    """Hash of what the lock is resolved from: requires-python, dependencies, extras,
    build requirements. Edits elsewhere in pyproject.toml (pytest, ruff) need no relock."""
    data = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))
    project = data.get("project", {})
    spec = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": data.get("build-system", {}).get("requires", []),
        "lock-extra": list(BUILD_REQUIREMENTS),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def recorded_spec_sha256(lock: Path) -> str | None:
    with open(lock, encoding="utf-8") as fh:
        first = fh.readline().rstrip("\n")
    return first[len(HEADER) :] if first.startswith(HEADER) else None


def pins(lock: Path) -> dict[str, str]:
    """Normalised distribution name -> exact version, from `name==version` lines."""
    out = {}
    for line in Path(lock).read_text(encoding="utf-8").splitlines():
        if m := _PIN.match(line):
            out[_normalise(m[1])] = m[2]
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check(root: Path = ROOT) -> str | None:
    """None when the lock matches pyproject.toml, else the one-line error to print."""
    lock, pyproject = root / LOCK_NAME, root / "pyproject.toml"
    if not lock.is_file():
        return f"error: {lock.name} is missing: run `make lock` and commit it"
    recorded = recorded_spec_sha256(lock)
    if recorded != spec_sha256(pyproject):
        return (
            f"error: {lock.name} does not match pyproject.toml's dependencies "
            "(one was edited without the other): run `make lock` and commit both"
        )
    return None


def stamp(root: Path = ROOT) -> None:
    """Put the spec hash on the lock's first line (called by `make lock` after uv writes it)."""
    lock = root / LOCK_NAME
    lines = lock.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and lines[0].startswith(HEADER):
        lines = lines[1:]
    header = HEADER + spec_sha256(root / "pyproject.toml") + "\n"
    lock.write_text(header + "".join(lines), encoding="utf-8")


def unlocked_installed(root: Path = ROOT) -> list[str]:
    """Installed distributions the lock does not name (left from an older lock)."""
    locked = pins(root / LOCK_NAME).keys() | {"pip", "retroloop"}
    names = {_normalise(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    return sorted(names - locked)


def lock_sha256(root: Path = ROOT) -> str | None:
    lock = root / LOCK_NAME
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None


def environment(root: Path = ROOT) -> dict[str, object]:
    """What a manifest records of the environment: the lock's sha256 (None when retroloop
    runs outside a checkout that has one) and every locked package whose installed version
    differs (`name: "locked -> installed"`); an empty dict means exactly the lock."""
    lock = root / LOCK_NAME
    if not lock.is_file():
        return {"lock_sha256": None, "differs_from_lock": {}}
    differs = {}
    for name, version in pins(lock).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        # The lock's local label (torch 2.13.0+cpu) is part of the installed version too.
        if installed != version:
            differs[name] = f"{version} -> {installed}"
    return {"lock_sha256": lock_sha256(root), "differs_from_lock": differs}


def main(argv: list[str]) -> int:
    match argv:
        case ["check"]:
            if (error := check()) is not None:
                print(error, file=sys.stderr)
                return 2
            return 0
        case ["stamp"]:
            stamp()
            return 0
        case ["differs"]:
            for name, change in environment()["differs_from_lock"].items():
                print(f"{name}: {change}")
            return 0
        case ["unlocked"]:
            print("\n".join(unlocked_installed()))
            return 0
    print("usage: python retroloop/envlock.py check|stamp|differs|unlocked", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
