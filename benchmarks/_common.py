"""Helpers the benchmark scripts share."""

from __future__ import annotations

import csv
from pathlib import Path


def append_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` under ``fields``.

    A file written with an older column list is first rewritten under ``fields`` (old rows keep
    their values, new columns stay empty), so columns never drift out of line with the header.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
            f.seek(0)
            old = list(csv.DictReader(f))
        if header != fields:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
