"""How training names a series, a file or a folder in what it prints and writes, without patient data.

Hospitals name export folders (and now and then files) after the patient — ``DOE_JOHN_1957/CT_CHEST`` — so no
path below the dataset folder reaches a message, a log line, ``run.json``, ``metrics.json``, the report or a model
card. What does:

- **the table's row number** ("row 7 of clinical.csv") for anything a row names: the user can look it up, and it
  says nothing about anyone;
- **the table's case id** (``case_id``), the key the user chose for the table: it is echoed and written to
  ``predictions.csv``, ``metrics.json`` and the report, so it must be a pseudonym, not a name (training/README.md);
- **a folder tag** for files and series no row names (an unreadable file, an unlabelled series): ``folder #1a2b3c4d``,
  the first 8 hex digits of the sha256 of the folder's path relative to the dataset folder, with the file's base name
  (the node's preprocessing names files so too). ``python -m training.phi DATA TAG`` prints the folder for the user
  on the machine that holds the data;
- **a SeriesInstanceUID only in an error message** for a series no row names (an unlabelled series: it has no
  other handle), never in a written artefact. A UID names nobody by itself, but it links to the patient in the PACS
  and in any other export that kept it (DICOM PS3.15's profile replaces UIDs for that reason), so it does not
  leave the terminal of the user who holds the data anyway.

Header values (PatientName, PatientID, birth date, age, sex) are never echoed; ages from the table are not either.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def _below(root: Path, path: Path | str) -> Path:
    """``path`` relative to ``root``, whichever of the two is given absolute or relative (the CLI's ``--data`` and
    ``python -m training.phi``'s may differ); ``path`` itself where it is not under ``root`` (already relative)."""
    p = Path(path)
    for a, b in ((p, Path(root)), (p.absolute(), Path(root).absolute()), (p.resolve(), Path(root).resolve())):
        try:
            return a.relative_to(b)
        except ValueError:
            continue
    return p


def folder_tag(root: Path, folder: Path | str) -> str:
    """``folder #xxxxxxxx`` for a folder under ``root`` (the dataset folder itself: ``the dataset folder``)."""
    rel = _below(root, folder).as_posix()
    if rel in ("", "."):
        return "the dataset folder"
    return f"folder #{hashlib.sha256(rel.encode()).hexdigest()[:8]}"


def file_ref(root: Path, path: Path | str) -> str:
    """A file under ``root`` as messages name it: its base name and its folder's tag (``IM0001.dcm in folder #…``);
    ``path`` may be absolute or relative to ``root``."""
    rel = _below(root, path)
    if rel.parent == Path("."):
        return rel.name
    return f"{rel.name} in {folder_tag(root, rel.parent)}"


def scrub(text: str, root: Path, path: Path | str) -> str:
    """``text`` (an exception's message, say) with ``path`` — absolute or relative to ``root`` — replaced by its
    :func:`file_ref`: OSError and some pydicom errors name the file they failed on."""
    rel = _below(root, path)
    forms = {str((Path(root) / rel).absolute()), str((Path(root) / rel).resolve()), str(Path(root) / rel), str(rel)}
    for form in sorted(forms, key=len, reverse=True):  # the longest first: a relative form is inside the others
        text = text.replace(form, file_ref(root, rel))
    return text


def locate(root: Path, tag: str) -> list[Path]:
    """The folders under ``root`` whose tag is ``tag`` (``#1a2b3c4d``, ``1a2b3c4d`` or ``folder #1a2b3c4d``)."""
    want = tag.split("#")[-1].strip().lower()
    root = Path(root)
    return [d for d in sorted(root.rglob("*")) if d.is_dir() and folder_tag(root, d).endswith("#" + want)]


def main(argv: list[str] | None = None) -> int:
    """``python -m training.phi DATA TAG``: the folder(s) a message's tag names, printed for the local user."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m training.phi DATA_FOLDER TAG", file=sys.stderr)
        return 2
    found = locate(Path(args[0]), args[1])
    for d in found:
        print(d)
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
