"""Reading another stage's CSV and JSON outputs: one error line naming the file and what is
wrong with it (missing, unreadable, a column or key absent), never a pandas traceback.

`produced_by` names the stage that writes the file, so the line says what to run:
"<path>: missing (run the analyze stage first)", "<path>: missing columns x; re-run analyze".
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stages.lib.cli import StageError


def _missing(path: Path, produced_by: str | None) -> StageError:
    hint = f" (run the {produced_by} stage first)" if produced_by else ""
    return StageError(f"{path}: missing{hint}")


def _absent(path: Path, what: str, names: list[str], produced_by: str | None) -> StageError:
    hint = f"; re-run {produced_by}" if produced_by else ""
    return StageError(f"{path}: missing {what} {', '.join(names)}{hint}")


def read_json(path: Path, keys: list[str] = (), produced_by: str | None = None) -> dict:
    """A JSON object with at least `keys` at its top level."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise _missing(path, produced_by) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise StageError(f"{path}: expected a JSON object")
    absent = [k for k in keys if k not in document]
    if absent:
        raise _absent(path, "keys", absent, produced_by)
    return document


def read_table(path: Path, columns: list[str] = (), produced_by: str | None = None,
               **read_csv_kwargs) -> pd.DataFrame:
    """A CSV (or, with sep="\\t", TSV) table with at least `columns`."""
    try:
        frame = pd.read_csv(path, **read_csv_kwargs)
    except FileNotFoundError:
        raise _missing(path, produced_by) from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a readable table ({exc})") from None
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise _absent(path, "columns", absent, produced_by)
    return frame
