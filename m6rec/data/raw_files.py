"""Reading raw files (delimited text, JSON Lines, Parquet) into string columns plus a ``line``
column: the 1-based physical line of each row (the row number for Parquet), so that every
skipped row can be reported as ``path:line: reason`` (:class:`Malformed`).  A file from which
no row can be read is an error naming it, with a hint when the delimiter looks wrong.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from m6rec.config import ConfigError

MAX_LISTED_MALFORMED = 1000  # every malformed row is counted; only this many are listed (reports stay small)


class Malformed:
    """Skipped rows: every one is counted, the first MAX_LISTED_MALFORMED are listed."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.count = 0

    def add(self, path: Path, lines, reason: str) -> None:
        lines = np.asarray(lines)
        self.count += len(lines)
        room = max(MAX_LISTED_MALFORMED - len(self.listed), 0)
        self.listed.extend(f"{path}:{n}: {reason}" for n in lines[:room])


def require_file(path: Path, key: str, what: str = "") -> Path:
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file not found: {path}{what}")
    return path


def read_bytes(path: Path) -> bytes:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def separator_hint(first_line: str) -> str:
    for sep, name in (("::", "'::'"), ("\t", "tabs"), ("|", "'|'"), (";", "';'"), (",", "commas")):
        if sep in first_line:
            return f"; its first line looks separated by {name}"
    return ""


def unreadable(path: Path, n_rows: int, first: str, first_line: str, expect: str) -> ConfigError:
    return ConfigError(f"{path}: none of its {n_rows} rows could be read (first: {first})"
                       f"{separator_hint(first_line)}. Expected {expect}")


def read_delimited(path: Path, log: Malformed, expect: str, *, sep: str, names: Optional[list[str]] = None,
                    encoding: str = "utf-8", quoted: bool = True) -> pd.DataFrame:
    """Delimited text (optionally gzipped) -> all-string columns plus ``line``.

    ``names`` None: the first line is a header.  ``quoted`` False for MovieLens
    ``::``/``|``/tab files, whose titles may contain bare quote characters.
    """
    raw = read_bytes(path)
    if not raw.strip():
        raise ConfigError(f"{path}: the file is empty. Expected {expect}")
    try:
        text, undecodable = raw.decode(encoding), False
    except UnicodeDecodeError:  # such rows are marked with U+FFFD and skipped below
        text, undecodable = raw.decode(encoding, errors="replace"), True
    first_line = text.split("\n", 1)[0].rstrip("\r")
    header = names is None  # only CSV/TSV files have a header, so sep is one character here
    if header:
        names = [n.strip() for n in next(csv.reader([first_line], delimiter=sep))]
    pa_sep = sep
    if len(sep) > 1:  # pyarrow splits on one character (ML-1M has no ':::' where this could go wrong)
        text, pa_sep = text.replace(sep, "\x1f"), "\x1f"

    wrong_width = []  # (record number, fields, text): pyarrow calls back only for these rows

    def on_invalid_row(row):
        wrong_width.append((row.number, row.actual_columns, row.text))
        return "skip"

    table = pa_csv.read_csv(
        io.BytesIO(text.encode("utf-8")),
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=int(header), use_threads=False),
        parse_options=pa_csv.ParseOptions(delimiter=pa_sep, quote_char='"' if quoted else False,
                                          ignore_empty_lines=False, invalid_row_handler=on_invalid_row),
        convert_options=pa_csv.ConvertOptions(column_types={n: pa.string() for n in names},
                                              strings_can_be_null=False),
    )
    # pyarrow numbers records, not lines: a quoted value with newlines spans several lines.
    # Every record is a parsed row or a skipped one, so lines follow from the record spans.
    n_records = int(header) + table.num_rows + len(wrong_width)
    spans = np.ones(n_records, dtype=np.int64)
    skipped = np.zeros(n_records, dtype=bool)
    if wrong_width:
        numbers = np.array([w[0] for w in wrong_width]) - 1
        skipped[numbers] = True
        spans[numbers] += [w[2].count("\n") for w in wrong_width]
    parsed = np.flatnonzero(~skipped)[int(header):]
    if quoted and table.num_rows:
        spans[parsed] += sum(pc.count_substring(col, "\n").to_numpy(zero_copy_only=False)
                             for col in table.columns)
    first_lines = np.cumsum(spans) - spans + 1

    df = table.to_pandas()
    df["line"] = first_lines[parsed]
    df = df[(df[names] != "").any(axis=1)]  # blank lines
    if wrong_width:
        sep_name = "tab" if sep == "\t" else repr(sep)
        by_width: dict[int, list[int]] = {}
        for number, fields, _ in wrong_width:
            by_width.setdefault(fields, []).append(first_lines[number - 1])
        for fields, lines in by_width.items():
            log.add(path, lines, f"expected {len(names)} fields separated by {sep_name}, got {fields}")
        if df.empty:
            number, fields, _ = wrong_width[0]
            first = f"line {first_lines[number - 1]}: {len(names)} fields expected, {fields} found"
            raise unreadable(path, len(wrong_width), first, first_line, expect)
    if undecodable:
        bad = np.zeros(len(df), dtype=bool)
        for n in names:
            bad |= df[n].str.contains("\ufffd", regex=False).to_numpy()
        log.add(path, df["line"][bad], f"not valid {encoding}")
        df = df[~bad]
    return df


def read_jsonl(path: Path, log: Malformed, expect: str) -> pd.DataFrame:
    raw = read_bytes(path)
    if not raw.strip():
        raise ConfigError(f"{path}: the file is empty. Expected {expect}")
    n_lines = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    try:  # fast path: pyarrow reads the whole file, one row per line
        df = pa_json.read_json(io.BytesIO(raw)).to_pandas()
        if len(df) == n_lines:
            df["line"] = np.arange(1, len(df) + 1)
            return df
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # slow path for files pyarrow rejects as a whole (a broken line, mixed value types)
    records, lines, bad = [], [], {}
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
            reason = None if isinstance(obj, dict) else "not a JSON object"
        except UnicodeDecodeError:
            reason = "not valid utf-8"
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg})"
        if reason:
            bad.setdefault(reason, []).append(n)
        else:
            records.append(obj)
            lines.append(n)
    for reason, bad_lines in bad.items():
        log.add(path, bad_lines, reason)
    if not records and bad:
        reason, bad_lines = next(iter(bad.items()))
        raise unreadable(path, sum(map(len, bad.values())), f"line {bad_lines[0]}: {reason}", "",
                          expect + " as JSON Lines (one object a line)")
    df = pd.DataFrame.from_records(records)
    df["line"] = lines
    return df


def read_table(path: Path, log: Malformed, expect: str, key: str) -> pd.DataFrame:
    """A generic-format file, its format chosen by extension (a trailing .gz is allowed for text)."""
    suffixes = [s.lower() for s in path.suffixes]
    kind = suffixes[-2] if len(suffixes) > 1 and suffixes[-1] == ".gz" else (suffixes[-1] if suffixes else "")
    if kind in (".csv", ".tsv"):
        return read_delimited(path, log, expect, sep="," if kind == ".csv" else "\t")
    if kind in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path, log, expect)
    if kind == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ConfigError(f"config key '{key}': {path} is not a readable Parquet file ({e})") from None
        if df.empty:
            raise ConfigError(f"{path}: the file has no rows. Expected {expect}")
        df["line"] = np.arange(1, len(df) + 1)
        return df
    raise ConfigError(f"config key '{key}': cannot tell the format of {path} from its extension; "
                      "use .jsonl/.json (JSON Lines), .csv/.tsv or .parquet")
