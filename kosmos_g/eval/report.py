"""Result tables shaped like the paper's: one row per pipeline (checkpoint), one column per metric.

Each table lives as a CSV (the source of truth) and a Markdown rendering of it. `upsert_rows`
adds rows, replacing the row of the same key (re-evaluating a pipeline updates its row; another
pipeline appends one), so one `--out` folder collects a whole comparison.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]


def read_rows(path: PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def upsert_rows(path: PathLike, rows: Sequence[Mapping[str, Any]], key: Sequence[str] = ("name",)) -> list[dict]:
    """Write `rows` into the CSV at `path`, each replacing the existing row with equal `key` columns
    (kept in its place) or appended. Columns are the union, in first-seen order. Returns all rows."""
    table = read_rows(path)
    columns = list(dict.fromkeys([c for r in table for c in r] + [c for r in rows for c in r]))
    index = {tuple(r.get(k, "") for k in key): i for i, r in enumerate(table)}
    for row in rows:
        row = {c: _cell(v) for c, v in row.items()}
        at = index.get(tuple(row.get(k, "") for k in key))
        if at is None:
            index[tuple(row.get(k, "") for k in key)] = len(table)
            table.append(row)
        else:
            table[at] = row
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(path)
    return table


def _fmt(value: str, digits: int) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value or "–"
    if math.isnan(number):
        return "–"
    return str(int(number)) if number.is_integer() and "." not in value else f"{number:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, str]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """A GitHub Markdown table of `columns` (missing values as '–', numbers to `digits` decimals)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: PathLike, title: str, table: str, notes: Sequence[str] = (),
                   header: Sequence[str] = ()) -> Path:
    """`# title`, the `header` lines (what the rows were computed with), the table, then the notes."""
    path = Path(path)
    intro = "".join(f"{line}\n\n" for line in header)
    path.write_text(f"# {title}\n\n{intro}{table}\n" + "".join(f"\n{n}\n" for n in notes), encoding="utf-8")
    return path


def log_scalars(log_dir: PathLike, scalars: Mapping[str, float], step: int = 0) -> None:
    """TensorBoard scalars (e.g. {"dreambench/DINO": 0.69}) into `log_dir` (one run per pipeline)."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    writer = SummaryWriter(str(log_dir))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), step)
    finally:
        writer.close()
