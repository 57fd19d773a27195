"""constraints.txt, the pins every install uses (the Docker images' pip steps and `make`), is current: it pins
each requirement of pyproject.toml (runtime, dev and deploy extras) at a version the requirement allows, holds
nothing that no longer leads back to pyproject.toml, and is what this environment runs, so the tests run the
versions the images ship. Regenerate it with `make lock` (uv pip compile)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PROJECT = "latent-verbalizer"
LOCKED_EXTRAS = ("dev", "deploy", "notebook")  # `make lock`; the vllm extra is for GPU machines and is not pinned
VIA_PYPROJECT = f"{PROJECT} (pyproject.toml)"
# A virtual environment's own installers, which its creator chose (a worktree's venv keeps them while it
# borrows another venv's packages); the images install pip's pin explicitly.
INSTALLERS = {"pip", "setuptools"}


def parse_lock(text: str) -> dict[str, list[tuple[Version, Marker | None, set[str]]]]:
    """name -> [(version, marker, names in its `# via` notes)]: uv writes one pin per line (a marker when it
    holds on some platforms or Pythons only), then the packages that need it."""
    pins: dict[str, list[tuple[Version, Marker | None, set[str]]]] = {}
    via: set[str] | None = None
    for line in text.splitlines():
        if m := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+?)(?: ; (.+))?", line.strip()):
            via = set()
            pins.setdefault(canonicalize_name(m[1]), []).append((Version(m[2]), Marker(m[3]) if m[3] else None, via))
        elif via is not None and (m := re.fullmatch(r"#\s+(?:via\s+)?(.+)", line.strip())) and m[1] != "via":
            via.add(m[1] if m[1] == VIA_PYPROJECT else str(canonicalize_name(m[1])))
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != PROJECT]


def test_lock_pins_every_requirement_of_pyproject() -> None:
    pins = parse_lock(LOCK.read_text())
    problems = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in constraints.txt")
        elif bad := [str(v) for v, _, _ in pins[name] if not req.specifier.contains(v, prereleases=True)]:
            problems.append(f"{req}: pinned at {', '.join(bad)}")
        elif VIA_PYPROJECT not in set().union(*(via for _, _, via in pins[name])):
            problems.append(f"{req}: pinned, but not as a requirement of pyproject.toml")
    assert not problems, "constraints.txt is out of date with pyproject.toml; run `make lock`:\n" + "\n".join(problems)


def test_lock_holds_nothing_stale() -> None:
    """Every pin is wanted by pyproject.toml or by another pin; a requirement dropped from pyproject.toml
    leaves pins that still say they come from it."""
    pins = parse_lock(LOCK.read_text())
    direct = {canonicalize_name(r.name) for r in project_requirements()}
    problems = []
    for name, entries in pins.items():
        via = set().union(*(v for _, _, v in entries))
        if VIA_PYPROJECT in via and name not in direct:
            problems.append(f"{name}: says pyproject.toml needs it, which no longer does")
        if not via or not via <= set(pins) | {VIA_PYPROJECT}:
            problems.append(f"{name}: wanted by {sorted(via - set(pins)) or 'nothing'}, not pinned here")
    assert not problems, "constraints.txt is out of date; run `make lock`:\n" + "\n".join(problems)
    # The images' first pip step installs pip at its pinned version, so an unreachable index fails the build.
    assert "pip" in pins, "constraints.txt must pin pip (the Dockerfile's venv stage relies on it)"


def test_this_environment_runs_the_locked_versions() -> None:
    """The tests run what the images ship: every pin that applies to this interpreter is installed, at its
    version (`make` installs with `-c constraints.txt`)."""
    pins = parse_lock(LOCK.read_text())
    wrong = []
    for name, entries in pins.items():
        if name in INSTALLERS:
            continue
        for version, marker, _ in entries:
            if marker is not None and not marker.evaluate():
                continue
            try:
                installed = Version(metadata.version(name))
            except metadata.PackageNotFoundError:
                wrong.append(f"{name}=={version}: not installed")
                continue
            if installed != version:
                wrong.append(f"{name}=={version}: {installed} installed")
    assert not wrong, "this environment differs from constraints.txt (run `make test` to reinstall):\n" + "\n".join(
        wrong)


def test_lock_parser_reads_what_uv_writes() -> None:
    """The checks above can fail: the parser sees pins, markers and `via` notes of uv's format."""
    text = """# header
torch==2.14.1
    # via
    #   latent-verbalizer (pyproject.toml)
    #   open-clip-torch
numpy==2.4.6 ; python_full_version < '3.12'
    # via torch
"""
    pins = parse_lock(text)
    assert pins["torch"] == [(Version("2.14.1"), None, {VIA_PYPROJECT, "open-clip-torch"})]
    (version, marker, via), = pins["numpy"]
    assert version == Version("2.4.6") and marker == Marker("python_full_version < '3.12'") and via == {"torch"}
