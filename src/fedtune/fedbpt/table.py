"""Task files as they come: .csv / .tsv (with a header row, or headerless with the column names
given in config; a tab-separated .txt, as MRPC and SNLI release theirs, reads as .tsv), .jsonl
and .json. A UTF-8 byte-order mark is dropped; header names keep any character (spaces, '#',
punctuation); TSV is read unquoted (GLUE's sentences may start with a quote mark) unless it is
quoted, which `quoting = "auto"` tells from the header row or from rows that only parse as quoted.
Every record carries its source as `file:line`, and every failure names the file and line."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import DataError

QUOTINGS = ("auto", "none", "csv")


@dataclass(frozen=True)
class TableFormat:
    columns: tuple[str, ...] = ()  # a headerless .csv/.tsv: its column names in order (() = header row)
    quoting: str = "auto"  # .tsv: auto | none (GLUE) | csv (fields may be quoted, holding tabs or newlines)

    @classmethod
    def from_task(cls, t) -> "TableFormat":
        return cls(tuple(str(c) for c in t.columns), t.quoting)


def read_table(path: Path, fmt: TableFormat = TableFormat()) -> list[tuple[str, dict]]:
    """(source, record) pairs from a .csv/.tsv or .jsonl/.json file."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first header name
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if suffix == ".txt":  # MRPC's and SNLI's releases: tab-separated text files
        if "\t" not in text.split("\n", 1)[0]:
            raise DataError(f"{path}: a .txt file is read as tab-separated values, and its first line holds no tab; "
                            "give a .csv, .tsv, .jsonl or .json file")
        suffix = ".tsv"
    if suffix in (".csv", ".tsv"):
        return _delimited(path, text, "\t" if suffix == ".tsv" else ",", fmt)
    if fmt.columns:
        raise DataError(f"{path}: task.columns names the columns of a headerless .csv/.tsv file; a {suffix} file "
                        "names its own fields")
    if suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            out.append((f"{path}:{lineno}", rec))
        return out
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return [(f"{path}[{i}]", r) for i, r in enumerate(obj)]
    raise DataError(f"{path}: expected a .csv, .tsv (or tab-separated .txt), .jsonl or .json file "
                    "(or hub:DATASET[@CONFIG][:SPLIT])")


def _rows(text: str, delimiter: str, quoted: bool) -> list[tuple[int, list[str]]]:
    """(line number where the row starts, fields), blank rows skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, strict=quoted)
    out, start = [], 1
    for row in reader:
        if row and any(c.strip() for c in row):
            out.append((start, row))
        start = reader.line_num + 1
    return out


def _parse(path: Path, text: str, delimiter: str, quoted: bool, fmt: TableFormat):
    try:
        rows = _rows(text, delimiter, quoted)
    except csv.Error as e:
        raise DataError(f"{path}: not a readable {'quoted ' if quoted else ''}table: {e}") from None
    if fmt.columns:
        return list(fmt.columns), rows
    if not rows:
        raise DataError(f"{path}: no header row")
    return [h.strip() for h in rows[0][1]], rows[1:]


def _delimited(path: Path, text: str, delimiter: str, fmt: TableFormat) -> list[tuple[str, dict]]:
    if fmt.quoting not in QUOTINGS:
        raise DataError(f"task.quoting = {fmt.quoting!r}: expected one of {', '.join(QUOTINGS)}")
    if delimiter == "," or fmt.quoting == "csv":
        quoted = True
    elif fmt.quoting == "none":
        quoted = False
    else:  # auto, TSV: quoted if the first row's fields all are, or if only the quoted reading is consistent
        first = next((line for line in text.splitlines() if line.strip()), "")
        cells = first.split(delimiter)
        quoted = all(len(c) >= 2 and c.startswith('"') and c.endswith('"') for c in cells)
        if not quoted:
            header, rows = _parse(path, text, delimiter, False, fmt)
            if any(len(r) != len(header) for _, r in rows):
                try:
                    qh, qrows = _parse(path, text, delimiter, True, fmt)
                    quoted = all(len(r) == len(qh) for _, r in qrows)
                except DataError:
                    quoted = False
    header, rows = _parse(path, text, delimiter, quoted, fmt)
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{path}: column {dup[0]!r} appears more than once in the "
                        f"{'task.columns list' if fmt.columns else 'header row'}")
    out = []
    for lineno, r in rows:
        if len(r) != len(header):
            names = "task.columns has" if fmt.columns else "the header has"
            raise DataError(f"{path}:{lineno}: {len(r)} fields, {names} {len(header)} ({', '.join(header)})"
                            + ("" if quoted or delimiter == "," else "; if fields are quoted, set task.quoting = 'csv'"))
        out.append((f"{path}:{lineno}", dict(zip(header, r))))
    return out
