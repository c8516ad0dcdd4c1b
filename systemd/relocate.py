"""Make a venv staged under DESTDIR run from its final place, PREFIX.

    python relocate.py DESTDIR PREFIX

systemd/install.sh runs this with the staged venv's own python after pip, when DESTDIR is set
(packaging). A venv made at DESTDIR+PREFIX names that path in its scripts' shebangs, pyvenv.cfg,
the activate scripts and its compiled modules, so it would only run from the staging tree. Here:

- every text file that names DESTDIR+PREFIX names PREFIX instead, and the RECORD of the package
  that installed it gets the file's new hash and size;
- every compiled module (.pyc) that names DESTDIR+PREFIX is removed, and every module compiled
  again as if it lay at PREFIX (install.sh runs pip with --no-compile under DESTDIR);
- a symbolic link into DESTDIR+PREFIX points into PREFIX.

A file that still names DESTDIR+PREFIX afterwards (a binary one, which cannot be rewritten) is
an error, with its path: the staged tree would not run where it is installed.
"""

from __future__ import annotations

import base64
import compileall
import csv
import hashlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def entries(root: Path) -> Iterator[Path]:
    """Every file and symbolic link under ``root``, without following links."""
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(top, name)
            if name in files or path.is_symlink():
                yield path


def rewrite(root: Path, old: bytes, new: bytes) -> tuple[set[str], list[Path]]:
    """Replace ``old`` by ``new`` in the text files and links under ``root``; remove the .pyc
    files that name ``old``. Returns the rewritten files and the binary ones left naming it."""
    changed: set[str] = set()
    binary: list[Path] = []
    for path in entries(root):
        if path.is_symlink():
            target = os.fsencode(os.readlink(path))
            if target == old or target.startswith(old + b"/"):
                path.unlink()
                path.symlink_to(os.fsdecode(new + target[len(old) :]))
            continue
        if not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data:
            continue
        if path.suffix == ".pyc":
            path.unlink()
        elif b"\0" in data:
            binary.append(path)
        else:
            path.write_bytes(data.replace(old, new))
            changed.add(os.path.normpath(path))
    return changed, binary


def record_hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def fix_records(root: Path, changed: set[str]) -> None:
    """Give the rewritten files their new hash and size in the RECORD that lists them."""
    for record in root.glob("lib*/python*/site-packages/*.dist-info/RECORD"):
        base = record.parent.parent
        with record.open(newline="") as f:
            rows = list(csv.reader(f))
        touched = False
        for row in rows:
            if len(row) == 3 and os.path.normpath(base / row[0]) in changed:
                path = base / row[0]
                row[1], row[2] = record_hash(path), str(path.stat().st_size)
                touched = True
        if touched:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            record.write_text(out.getvalue())


def naming(root: Path, old: bytes) -> list[Path]:
    """The files under ``root`` whose bytes contain ``old``."""
    files = (p for p in entries(root) if p.is_file() and not p.is_symlink())
    return [p for p in files if old in p.read_bytes()]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(os.path.isabs(a) for a in argv):
        print("usage: relocate.py DESTDIR PREFIX (both absolute paths)", file=sys.stderr)
        return 2
    destdir, prefix = (os.path.normpath(a) for a in argv)
    staged = Path(destdir + prefix)
    old, new = os.fsencode(staged), os.fsencode(prefix)
    changed, binary = rewrite(staged, old, new)
    fix_records(staged, changed)
    # Modules that fail to compile (templates, other Pythons' code) are skipped, as pip does.
    compileall.compile_dir(staged, ddir=prefix, quiet=2)
    left = binary + [p for p in naming(staged, old) if p not in binary]
    if left:
        names = ", ".join(str(p) for p in left[:10]) + (" ..." if len(left) > 10 else "")
        print(f"relocate.py: {len(left)} file(s) still name {staged}: {names}", file=sys.stderr)
        return 1
    print(f"relocated {staged} to {prefix}: {len(changed)} file(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
