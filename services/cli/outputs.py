"""A command's output folder, written as one run: never a mix of two runs, never damaged by a failed one.

    check_out(out, overwrite, command, inputs)   before any work: refuse a folder holding another run
                                                 unless --overwrite, and any folder --overwrite must not replace
    with staged_run(out, command) as tmp:        write everything into tmp (a folder beside out);
        ...                                      on success tmp replaces out whole, on any failure it is
                                                 removed and out is left as it was, byte for byte

A finished run carries MARKER (the command and its arguments), which is how a later run knows the folder
is one: `--overwrite` replaces such a folder whole, with whatever was added to it since (labels, analyses).
A folder without the marker counts as a run only when it holds nothing but names these commands write
(runs made before the marker existed); any other non-empty folder is refused even with --overwrite, so a
mistyped --out never deletes someone's files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".latent-verbalizer-run.json"
# Every name a command of this package writes into its --out folder (verbalize, demo, analyze).
RUN_NAMES = {
    MARKER, "results.jsonl", "captions.json", "captions.csv", "run.json", "prior.json", "regions.csv", "attributions",
    "features", "images", "labels.json", "distribution.csv", "figure.png", "entropy.png", "grounding.csv",
    "grounding.png", "summary.json", "report.md", "report.json", "regions",
}


class OutputError(ValueError):
    """An --out folder this run may not write; the message says what to do."""


def check_out(out: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an `out` that holds another run (without `overwrite`), a non-empty folder
    that holds something else, a file, or a folder that holds one of the run's own inputs."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    made_by = _made_by(out)
    foreign = [name for name in entries if name not in RUN_NAMES]
    if made_by is None and foreign:
        raise OutputError(f"--out {out} is not empty and holds no latent-verbalizer run ({_few(foreign)}):"
                          " choose a new or empty folder")
    if not overwrite:
        raise OutputError(f"--out {out} holds an earlier {made_by or 'run'} ({_few(entries)}): pass --overwrite"
                          " to replace that run whole, or choose another folder")
    resolved = out.resolve()
    for raw in inputs:
        path = Path(raw).resolve()
        if path == resolved or resolved in path.parents:
            raise OutputError(f"the input {raw} lies inside --out {out}, which --overwrite would replace:"
                              " choose another folder")


@contextmanager
def staged_run(out: Path, command: str) -> Iterator[Path]:
    """A fresh folder beside `out` to write the run into; when the block ends without an exception it
    becomes `out` (an earlier run there is removed whole), otherwise it is removed and `out` is untouched.
    Call check_out first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"command": command, "argv": sys.argv[1:]}, indent=1) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """tmp becomes out; the earlier out, if any, is moved aside first and then removed."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:12]}")
        os.replace(out, old)
    os.replace(tmp, out)  # onto a missing or an empty folder
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _made_by(out: Path) -> str | None:
    """The command whose run `out` holds, from its marker; None without one."""
    try:
        return f"`{json.loads((out / MARKER).read_text())['command']}` run"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")
