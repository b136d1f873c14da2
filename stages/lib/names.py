"""File and folder names that come from data (image file names, category, class, field and
scheme names): made safe or refused here, in one place, and never joined outside their
folder.

Two policies:
- an image's file name is refused unless it is a plain name (plain_name_problem): every
  stage finds an image's mask and prediction by its stem, so renaming one would lose it;
- a name built from a category, class or field (a column, a figure) is made safe
  (safe_filename): characters outside the POSIX portable file name set become "_", a long
  name is cut, and a changed name gets a short stable hash of the original, so two names
  that differ only in what was replaced stay two names.
FileNames refuses two names that would be one file where case is folded (macOS, Windows),
and inside() is the last line: a joined path that resolves outside its folder is refused.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from stages.lib.cli import StageError

# POSIX's portable file name character set: the same file on every file system and shell.
_NOT_PORTABLE = re.compile(r"[^A-Za-z0-9._-]")
# A made-safe name stays readable; with its hash and a suffix it is far below NAME_MAX.
MAX_SAFE_CHARS = 100
# NAME_MAX is 255 bytes; what stages add to an image's stem (".region.png") and what a
# temporary adds around that (".<name>.<pid>-<start>-<random>.tmp") must still fit.
MAX_PLAIN_BYTES = 180
HASH_CHARS = 8


def safe_filename(name: object, suffix: str = "", used: FileNames | None = None,
                  owner: str | None = None) -> str:
    """`name` as one portable file name plus `suffix` (code-given, e.g. ".png"): unchanged
    when already portable, not hidden and short; else cleaned, cut to MAX_SAFE_CHARS and
    marked with a hash of the original. With `used`, claimed there for `owner` (what the
    name stands for, in words; default: the original name quoted)."""
    text = str(name)
    cleaned = _NOT_PORTABLE.sub("_", text)
    cleaned = "_" + cleaned[1:] if cleaned.startswith(".") else cleaned   # hidden, "..", "."
    cleaned = cleaned[:MAX_SAFE_CHARS] or "_"
    if cleaned != text:
        cleaned = f"{cleaned}-{name_hash(text)}"
    result = cleaned + suffix
    if used is not None:
        used.claim(result, repr(text) if owner is None else owner)
    return result


def name_hash(text: str) -> str:
    # surrogatepass: a lone surrogate (JSON allows "\udc80") still hashes, stably.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def plain_name_problem(name: object) -> str | None:
    """Why `name` cannot be used as it is as one file name inside a folder, or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if name in ("", ".", ".."):
        return "is not a file name"
    if "/" in name or "\\" in name:
        return "has a folder separator"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "has a control character (NUL, newline, ...)"
    if name.startswith("."):
        return "starts with a dot (hidden, like segflow's temporaries)"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if size > MAX_PLAIN_BYTES:
        return f"is {size} bytes long (at most {MAX_PLAIN_BYTES})"
    return None


def check_plain_name(name: object, what: str) -> str:
    """`name` if plain_name_problem finds nothing, else StageError naming `what` (the file
    and entry it came from) and the name."""
    problem = plain_name_problem(name)
    if problem:
        raise StageError(f"{what}: file name {name!r} {problem}")
    return name


def name_key(name: str) -> str:
    """What a case-folding, normalising file system (APFS, NTFS) compares."""
    return unicodedata.normalize("NFC", name).casefold()


class FileNames:
    """The names given out in one folder (or one table's columns), each to one owner (what
    it stands for, in words, e.g. "category 3 'car'"); a name a second owner asks for, up
    to case, is refused."""

    def __init__(self, where: str):
        self.where = where
        self._owners: dict[str, tuple[str, str]] = {}

    def claim(self, name: str, owner: str) -> str:
        first, first_owner = self._owners.setdefault(name_key(name), (name, owner))
        if first_owner != owner:
            names = repr(name) if first == name else f"{first!r} and {name!r}"
            raise StageError(f"{self.where}: {first_owner} and {owner} would both be named "
                             f"{names}, one file where case is folded (macOS, Windows)")
        return name


def inside(folder: str | Path, *names: str, resolve: bool = True) -> Path:
    """folder / names, refused unless it stays inside folder: the last line behind the
    checks above. resolve=True (a stage's own output folder): as the file system resolves
    it, symbolic links included; False (inputs, which DVC may link into its cache): by the
    text of the path alone."""
    folder = Path(folder)
    path = folder.joinpath(*names)
    if "\0" in str(path):
        raise StageError(f"{str(path)!r}: has a NUL byte; refused")
    try:
        root, target = ((folder.resolve(), path.resolve()) if resolve else
                        (Path(os.path.abspath(folder)), Path(os.path.abspath(path))))
    except (OSError, RuntimeError) as exc:   # a symbolic link loop
        raise StageError(f"{path}: cannot be resolved ({exc})") from None
    if target == root or not target.is_relative_to(root):
        raise StageError(f"{path}: resolves to {target}, outside {folder}; refused")
    return path


def seed_dir(seed: int) -> str:
    """The folder of one training seed's files under a scheme's models/ and predictions/
    folders (the rules and dvc.yaml write the same: tests/test_engines.py)."""
    return f"seed{int(seed)}"
