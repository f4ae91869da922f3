"""Raw recommendation logs -> :class:`RawData` -> :class:`CleanData`.

``load_source(cfg.data)`` reads one of the official MovieLens layouts
(``ml-100k``, ``ml-1m``, ``ml-latest``) or the generic format (JSON Lines,
CSV/TSV or Parquet files chosen by extension) into the tables described in
``docs/architecture.md``.  ``clean(raw, cfg.data.filters)`` removes
duplicates, unknown items, low ratings and sparse users/items, and sorts each
user's timeline.

Bad input rows never crash a run: a row with the wrong number of fields, a
non-integer id or timestamp, a non-numeric rating or bytes that do not decode
is skipped, counted in ``RawData.counts["malformed_rows"]`` and listed in
``RawData.malformed`` as ``"path:line: reason"`` (1-based physical line
numbers, the CSV header being line 1; for Parquet the row number).  A file
from which *no* row can be read is an error instead (a wrong delimiter or the
wrong ``data.source``), as is a missing file.

Files are parsed in bulk with pyarrow and pandas; only the JSON Lines
fallback (a file pyarrow cannot read in one go) and the small item and user
tables touch rows one by one in Python.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from m6rec.config import ConfigError, DataConfig, FilterConfig, GenericSourceConfig
from m6rec.data.raw_files import (
    Malformed,
    read_delimited,
    read_table,
    require_file,
    separator_hint,
    unreadable,
)

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "builtin"
EPOCH = pd.Timestamp(0, tz="UTC")

# ML-100K u.genre order; used when u.genre is absent.  "unknown" is dropped from item
# genres like ml-latest's "(no genres listed)", so both mean "no genres".
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]
# ML-1M README codes.  ML-100K gives ages in years; they are put in the same brackets
# so user profiles read alike across catalogs.
AGE_BRACKETS = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+"}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]
GENDERS = {"M": "male", "F": "female"}

INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "event", "order"]


@dataclass
class RawData:
    """The tables of docs/architecture.md as read, before cleaning."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    tags: pd.DataFrame
    malformed: list[str] = field(default_factory=list)  # "path:line: reason", the first raw_files.MAX_LISTED_MALFORMED
    counts: dict = field(default_factory=dict)


@dataclass
class CleanData:
    interactions: pd.DataFrame  # sorted by user_id, timestamp, order
    items: pd.DataFrame  # the full catalog, also items nobody interacted with
    users: pd.DataFrame
    tags: pd.DataFrame
    report: dict = field(default_factory=dict)  # rows removed by each cleaning step, in order


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
def resolve_root(root: str) -> Path:
    """``builtin:NAME`` -> the copy shipped in ``m6rec/builtin/NAME``; else a path with ~ and $VARS expanded."""
    if root.startswith("builtin:"):
        path = BUILTIN_DIR / root[len("builtin:"):]
        if not path.is_dir():
            shipped = sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()) if BUILTIN_DIR.is_dir() else []
            raise ConfigError(f"config key 'data.root': no built-in dataset {root!r}; shipped: {shipped}")
        return path
    path = Path(os.path.expandvars(os.path.expanduser(root)))
    if not path.is_dir():
        raise ConfigError(f"config key 'data.root': directory not found: {path}")
    return path


def load_source(data_cfg: DataConfig) -> RawData:
    """Read ``data_cfg.source`` from ``data_cfg.root`` into :class:`RawData` (uncleaned)."""
    root = resolve_root(data_cfg.root)
    log = Malformed()
    readers = {"ml-100k": _load_ml100k, "ml-1m": _load_ml1m, "ml-latest": _load_ml_latest}
    if data_cfg.source == "generic":
        interactions, items, users, tags = _load_generic(root, data_cfg.generic, log)
    elif data_cfg.source in readers:
        interactions, items, users, tags = readers[data_cfg.source](root, log)
    else:
        raise ConfigError(f"config key 'data.source': bad value {data_cfg.source!r}")

    # {images.dir}/{item_id}.jpg, unless the generic items file names each item's image itself
    if data_cfg.images.dir and not (data_cfg.source == "generic" and data_cfg.generic.image_field):
        image_dir = root / os.path.expandvars(os.path.expanduser(data_cfg.images.dir))
        if not image_dir.is_dir():
            raise ConfigError(f"config key 'data.images.dir': directory not found: {image_dir}")
        names = set(os.listdir(image_dir))
        file_names = items["item_id"] + ".jpg"
        paths = str(image_dir.resolve()) + os.sep + file_names
        items["image"] = pd.Series(np.where(file_names.isin(names), paths, None), index=items.index, dtype=object)

    if users is None:  # no user file: every user still gets a row, with an empty profile
        users = pd.DataFrame({"user_id": pd.unique(interactions["user_id"])})
        users["attributes"] = [{} for _ in range(len(users))]
    interactions = interactions.reset_index(drop=True)
    interactions["order"] = np.arange(len(interactions), dtype=np.int64)  # file order across all files read
    counts = {
        "interactions": len(interactions),
        "items": len(items),
        "users": len(users),
        "tags": len(tags),
        "items_with_image": int(items["image"].notna().sum()),
        "malformed_rows": log.count,
    }
    return RawData(interactions[INTERACTION_COLUMNS], items.reset_index(drop=True), users.reset_index(drop=True),
                   tags.reset_index(drop=True), log.listed, counts)


def clean(raw: RawData, filters_cfg: FilterConfig) -> CleanData:
    """Apply the cleaning steps in order and sort each user's timeline.

    Steps (each one's removed rows are counted in ``report``):

    1. duplicate rows -- same user, item, timestamp, rating and event -- keep the first;
    2. interactions whose item is not in the catalog;
    3. ratings below ``min_rating`` (when set; rows without a rating go too);
    4. the k-core (when ``kcore`` > 0): repeatedly drop users and items with fewer
       than k interactions until none is left;
    5. users with fewer than ``min_user_interactions`` interactions.

    The result is sorted by ``user_id``, then ``timestamp``, then ``order``: a stable
    sort on time where interactions with the same timestamp (MovieLens has many)
    keep the order they had in the source files.  The item catalog is kept whole --
    retrieval ranks every item -- and ``report["items_with_interactions"]`` says how
    many items are left with interactions.  If a step leaves nothing, ConfigError
    names it.
    """
    df = raw.interactions
    report: dict = {"input_interactions": len(df)}

    def keep(rows: pd.Series, counter: str, why: str) -> None:
        nonlocal df
        report[counter] = int((~rows).sum())
        df = df[rows]
        if df.empty:
            raise ConfigError(f"no interactions left after {why} (of {report['input_interactions']} read)")

    keep(~df.duplicated(["user_id", "item_id", "timestamp", "rating", "event"]), "duplicates_removed",
         "removing duplicate rows")
    keep(df["item_id"].isin(raw.items["item_id"]), "unknown_items_removed",
         "dropping interactions whose item_id is not in the item catalog (are the items file and ids right?)")
    if filters_cfg.min_rating is not None:
        keep(df["rating"] >= filters_cfg.min_rating, "below_min_rating_removed",
             f"data.filters.min_rating={filters_cfg.min_rating}")
    if filters_cfg.kcore > 0:
        k, before = filters_cfg.kcore, len(df)
        users_before, items_before = df["user_id"].nunique(), df["item_id"].nunique()
        rounds = 0
        while True:
            dense = (df["user_id"].map(df["user_id"].value_counts()) >= k) & (
                df["item_id"].map(df["item_id"].value_counts()) >= k)
            if dense.all():
                break
            rounds += 1
            keep(dense, "kcore_removed", f"data.filters.kcore={k} (round {rounds})")
        report.update(kcore_removed=before - len(df), kcore_rounds=rounds,
                      kcore_removed_users=users_before - df["user_id"].nunique(),
                      kcore_removed_items=items_before - df["item_id"].nunique())
    per_user = df["user_id"].map(df["user_id"].value_counts())
    short = per_user < filters_cfg.min_user_interactions
    report["short_users_removed"] = int(df.loc[short, "user_id"].nunique())
    keep(~short, "short_user_interactions_removed",
         f"data.filters.min_user_interactions={filters_cfg.min_user_interactions}")

    df = df.sort_values(["user_id", "timestamp", "order"], kind="stable").reset_index(drop=True)
    report.update(
        interactions=len(df),
        users=int(df["user_id"].nunique()),
        items=len(raw.items),
        items_with_interactions=int(df["item_id"].nunique()),
        # interactions sharing user and timestamp with another one: ordered by file order
        timestamp_ties=int(df.duplicated(["user_id", "timestamp"], keep=False).sum()),
    )
    return CleanData(df, raw.items, raw.users, raw.tags, report)


# --------------------------------------------------------------------------
# Typing columns; bad values are logged and their rows dropped
# --------------------------------------------------------------------------
def _as_text(s: pd.Series) -> pd.Series:
    """Values as the text a CSV would hold (JSON and Parquet give numbers); missing stays NaN."""
    if pd.api.types.is_float_dtype(s) and (s.dropna() % 1 == 0).all():
        s = s.astype("Int64")  # 12.0 -> "12", so numeric ids match across files
    return s.astype("str").str.strip()


def _numbers(text: pd.Series) -> pd.Series:
    """Decimal text -> float64, NaN where it is not a plain number ("nan", "inf" and "0x1f" are not).

    pyarrow's cast is several times faster than pd.to_numeric on strings, but fails on
    the whole array for one bad value, so bad values are masked to null first.
    """
    arr = pa.array(text, type=pa.large_string())
    plain = pc.match_substring_regex(arr, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    numbers = pc.cast(pc.if_else(plain, arr, pa.scalar(None, pa.large_string())), pa.float64())
    return pd.Series(numbers.to_numpy(zero_copy_only=False), index=text.index)


def _missing(s: pd.Series) -> pd.Series:
    return s.isna() | (s == "")


def _bad_id(s: pd.Series, integer: bool) -> pd.Series:
    """MovieLens ids must be integers; generic ids any non-empty text."""
    return ~s.str.fullmatch(r"\d+").fillna(False).astype(bool) if integer else _missing(s)


def _id_problem(integer: bool) -> str:
    return "is not an integer" if integer else "is empty"


def _timestamps(s: pd.Series, iso: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds and a bad-value mask. Integers always; for ``iso`` also floats
    (floored) and ISO-8601 strings (naive ones taken as UTC)."""
    if pd.api.types.is_datetime64_any_dtype(s):
        utc = s.dt.tz_localize("UTC") if s.dt.tz is None else s
        bad = utc.isna().to_numpy(copy=True)
        secs = ((utc - EPOCH) // pd.Timedelta(seconds=1)).fillna(0)
        return secs.to_numpy(dtype=np.int64), bad
    text = _as_text(s)
    number = _numbers(text)
    bad = (number.isna() | np.isinf(number)).to_numpy(copy=True)  # 1e999 parses as inf
    if not iso:
        bad |= (number % 1 != 0).to_numpy()
    secs = np.floor(number.fillna(0).where(~bad, 0)).to_numpy(dtype=np.int64)
    if iso and bad.any():
        dates = pd.to_datetime(text[bad], errors="coerce", utc=True, format="ISO8601")
        parsed = dates.notna().to_numpy()
        where = np.flatnonzero(bad)[parsed]
        secs[where] = ((dates[parsed] - EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
        bad[where] = False
    return secs, bad


def _drop_bad(df: pd.DataFrame, path: Path, log: Malformed, checks: list[tuple[str, np.ndarray]],
              expect: str) -> pd.DataFrame:
    """Drop rows failing a check; each is logged under the first check it fails."""
    failed = np.zeros(len(df), dtype=bool)
    first = None
    for reason, mask in checks:
        mask = np.asarray(mask, dtype=bool)
        new = mask & ~failed
        if new.any():
            log.add(path, df["line"].to_numpy()[new], reason)
            first = first or f"line {df['line'].to_numpy()[new][0]}: {reason}"
        failed |= mask
    if len(df) and failed.all():
        raise unreadable(path, len(df), first, "", expect)
    return df[~failed]


def _check_columns(df: pd.DataFrame, path: Path, required: list[str], key: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c != "line"]
        hint = separator_hint(found[0]) if len(found) == 1 else ""
        raise ConfigError(f"config key '{key}': {path} lacks column(s) {missing}; found {found}{hint}")


def _interactions(df: pd.DataFrame, path: Path, log: Malformed, expect: str, *, strict: bool) -> pd.DataFrame:
    """Type an interactions table.  ``strict`` (MovieLens): integer ids, integer timestamps,
    a rating on every row.  Otherwise ids are any non-empty text, timestamps may be ISO-8601
    and rating/event are optional."""
    users, items = _as_text(df["user_id"]), _as_text(df["item_id"])
    secs, bad_time = _timestamps(df["timestamp"], iso=not strict)
    rating_text = _as_text(df["rating"]) if "rating" in df else pd.Series(np.nan, index=df.index, dtype="str")
    rating = _numbers(rating_text)
    bad_rating = rating.isna() & (~_missing(rating_text) | strict)
    event = _as_text(df["event"]).astype(object).where(lambda e: ~_missing(e), None) if "event" in df \
        else pd.Series([None] * len(df), index=df.index, dtype=object)
    out = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": secs, "rating": rating, "event": event,
                        "line": df["line"].to_numpy()}, index=df.index)
    out = _drop_bad(out, path, log, [
        (f"user_id {_id_problem(strict)}", _bad_id(users, strict)),
        (f"item_id {_id_problem(strict)}", _bad_id(items, strict)),
        ("timestamp is not " + ("an integer" if strict else "a number or ISO-8601 time"), bad_time),
        ("rating is not a number", bad_rating),
    ], expect)
    return out.drop(columns="line")


def _dedupe(df: pd.DataFrame, path: Path, log: Malformed, id_col: str) -> pd.DataFrame:
    dup = df[id_col].duplicated().to_numpy()
    if dup.any():
        log.add(path, df["line"].to_numpy()[dup], f"duplicate {id_col} (the first row is kept)")
    return df[~dup]


def _items(df: pd.DataFrame, path: Path, log: Malformed, expect: str, *, strict: bool,
           genres: list, text: Optional[list] = None) -> pd.DataFrame:
    ids = _as_text(df["item_id"])
    items = pd.DataFrame({"item_id": ids, "title": _as_text(df["title"]).fillna(""), "line": df["line"].to_numpy()},
                         index=df.index)
    items["genres"] = pd.Series(genres, index=df.index, dtype=object)
    items["text"] = pd.Series(text if text is not None else [{}] * len(df), index=df.index, dtype=object)
    items["image"] = None
    items = _drop_bad(items, path, log, [(f"item_id {_id_problem(strict)}", _bad_id(ids, strict))], expect)
    return _dedupe(items, path, log, "item_id").drop(columns="line")


def _users(ids: pd.Series, attributes: list[dict], lines, path: Path, log: Malformed, expect: str,
           strict: bool) -> pd.DataFrame:
    users = pd.DataFrame({"user_id": _as_text(ids), "attributes": attributes, "line": np.asarray(lines)})
    users = _drop_bad(users, path, log, [(f"user_id {_id_problem(strict)}", _bad_id(users["user_id"], strict))],
                      expect)
    return _dedupe(users, path, log, "user_id").drop(columns="line")


def _split_genres(values: pd.Series) -> list[list[str]]:
    """Genres given as a list or a '|'-separated string; '(no genres listed)' means none."""
    out = []
    for v in values:
        parts = list(v) if isinstance(v, (list, tuple, np.ndarray)) else ([] if pd.isna(v) else str(v).split("|"))
        out.append([str(g).strip() for g in parts if str(g).strip() and str(g).strip() != "(no genres listed)"])
    return out


def _cell_text(v) -> Optional[str]:
    if isinstance(v, str):
        return v.strip() or None
    if v is None or (np.ndim(v) == 0 and pd.isna(v)):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # 25.0 from a column with gaps -> "25"
    return str(v)


def _attribute_dicts(df: pd.DataFrame, columns: list[str]) -> list[dict]:
    """One {column: text} per row of a (small) item or user table, leaving out missing values."""
    texts = [[_cell_text(v) for v in df[c]] for c in columns]
    return [{c: v for c, v in zip(columns, row) if v is not None} for row in zip(*texts)] if columns \
        else [{} for _ in range(len(df))]


def _empty_tags() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(dtype="str"), "item_id": pd.Series(dtype="str"),
                         "tag": pd.Series(dtype="str")})


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------
def _load_ml100k(root: Path, log: Malformed):
    layout = " (data.source 'ml-100k' expects the official layout: u.data, u.item, u.user)"
    data = require_file(root / "u.data", "data.root", layout)
    item_file = require_file(root / "u.item", "data.root", layout)
    expect = "ml-100k u.data lines 'user<TAB>item<TAB>rating<TAB>timestamp' (data.source)"
    ratings = read_delimited(data, log, expect, sep="\t", names=["user_id", "item_id", "rating", "timestamp"],
                              encoding="latin-1", quoted=False)
    interactions = _interactions(ratings, data, log, expect, strict=True)

    genre_file = root / "u.genre"
    names = ML100K_GENRES
    if genre_file.is_file():  # 'name|index' lines
        pairs = [ln.rsplit("|", 1) for ln in genre_file.read_text("latin-1").splitlines() if "|" in ln]
        names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    expect = f"ml-100k u.item lines 'id|title|release|video release|url|{len(names)} genre flags' (data.source)"
    cols = ["item_id", "title", "release", "video_release", "url"] + [f"g{i}" for i in range(len(names))]
    raw_items = read_delimited(item_file, log, expect, sep="|", names=cols, encoding="latin-1", quoted=False)
    flags = raw_items[cols[5:]].to_numpy() == "1"
    genres = [[g for g, on in zip(names, row) if on and g != "unknown"] for row in flags]
    items = _items(raw_items, item_file, log, expect, strict=True, genres=genres)

    users = None
    user_file = root / "u.user"
    if user_file.is_file():
        expect = "ml-100k u.user lines 'id|age|gender|occupation|zip' (data.source)"
        raw_users = read_delimited(user_file, log, expect, sep="|",
                                    names=["user_id", "age", "gender", "occupation", "zip"],
                                    encoding="latin-1", quoted=False)
        ages = pd.to_numeric(raw_users["age"], errors="coerce")
        raw_users["age"] = pd.cut(ages, [-np.inf, 17, 24, 34, 44, 49, 55, np.inf],
                                  labels=list(AGE_BRACKETS.values())).astype(object)
        raw_users["gender"] = raw_users["gender"].map(GENDERS).fillna(raw_users["gender"])
        attributes = _attribute_dicts(raw_users, ["age", "gender", "occupation", "zip"])
        users = _users(raw_users["user_id"], attributes, raw_users["line"], user_file, log, expect, strict=True)
    return interactions, items, users, _empty_tags()


def _load_ml1m(root: Path, log: Malformed):
    layout = (" (data.source 'ml-1m' expects the official layout: ratings.dat[.gz] or ratings*.dat.gz, "
              "movies.dat, users.dat)")
    # the official ratings.dat, gzipped or not, else every gzipped part (ratings_users1-2999.dat.gz, ...)
    rating_files = [root / n for n in ("ratings.dat", "ratings.dat.gz") if (root / n).is_file()][:1] \
        or sorted(root.glob("ratings*.dat.gz")) or [require_file(root / "ratings.dat", "data.root", layout)]
    movie_file = require_file(root / "movies.dat", "data.root", layout)
    expect = "ml-1m lines 'UserID::MovieID::Rating::Timestamp' (data.source)"
    interactions = pd.concat([
        _interactions(read_delimited(f, log, expect, sep="::", names=["user_id", "item_id", "rating", "timestamp"],
                                      encoding="latin-1", quoted=False), f, log, expect, strict=True)
        for f in rating_files], ignore_index=True)

    expect = "ml-1m movies.dat lines 'MovieID::Title::Genres' (data.source)"
    raw_items = read_delimited(movie_file, log, expect, sep="::", names=["item_id", "title", "genres"],
                                encoding="latin-1", quoted=False)
    items = _items(raw_items, movie_file, log, expect, strict=True, genres=_split_genres(raw_items["genres"]))

    users = None
    user_file = root / "users.dat"
    if user_file.is_file():
        expect = "ml-1m users.dat lines 'UserID::Gender::Age::Occupation::Zip-code' (data.source)"
        raw_users = read_delimited(user_file, log, expect, sep="::",
                                    names=["user_id", "gender", "age", "occupation", "zip"],
                                    encoding="latin-1", quoted=False)
        occupations = {str(code): name for code, name in enumerate(ML1M_OCCUPATIONS)}
        for column, codes in (("gender", GENDERS), ("age", AGE_BRACKETS), ("occupation", occupations)):
            raw_users[column] = raw_users[column].map(codes).fillna(raw_users[column])  # unknown codes stay as given
        attributes = _attribute_dicts(raw_users, ["age", "gender", "occupation", "zip"])
        users = _users(raw_users["user_id"], attributes, raw_users["line"], user_file, log, expect, strict=True)
    return interactions, items, users, _empty_tags()


def _load_ml_latest(root: Path, log: Malformed):
    layout = " (data.source 'ml-latest' expects the official layout: ratings.csv, movies.csv[, tags.csv])"
    rating_file = require_file(root / "ratings.csv", "data.root", layout)
    movie_file = require_file(root / "movies.csv", "data.root", layout)
    rename = {"userId": "user_id", "movieId": "item_id"}
    expect = "ml-latest ratings.csv with header userId,movieId,rating,timestamp (data.source)"
    ratings = read_delimited(rating_file, log, expect, sep=",")
    _check_columns(ratings, rating_file, ["userId", "movieId", "rating", "timestamp"], "data.root")
    interactions = _interactions(ratings.rename(columns=rename), rating_file, log, expect, strict=True)

    expect = "ml-latest movies.csv with header movieId,title,genres (data.source)"
    raw_items = read_delimited(movie_file, log, expect, sep=",")
    _check_columns(raw_items, movie_file, ["movieId", "title", "genres"], "data.root")
    items = _items(raw_items.rename(columns=rename), movie_file, log, expect, strict=True,
                   genres=_split_genres(raw_items["genres"]))

    tags = _empty_tags()
    tag_file = root / "tags.csv"
    if tag_file.is_file():
        expect = "ml-latest tags.csv with header userId,movieId,tag,timestamp (data.source)"
        raw_tags = read_delimited(tag_file, log, expect, sep=",").rename(columns=rename)
        _check_columns(raw_tags, tag_file, ["user_id", "item_id", "tag"], "data.root")
        raw_tags = raw_tags.assign(user_id=_as_text(raw_tags["user_id"]), item_id=_as_text(raw_tags["item_id"]))
        raw_tags = _drop_bad(raw_tags, tag_file, log, [
            ("userId is not an integer", _bad_id(raw_tags["user_id"], True)),
            ("movieId is not an integer", _bad_id(raw_tags["item_id"], True)),
            ("tag is empty", _missing(raw_tags["tag"]))], expect)
        tags = raw_tags[["user_id", "item_id", "tag"]]
    return interactions, items, None, tags


def _load_generic(root: Path, g: GenericSourceConfig, log: Malformed):
    def path_of(name: str) -> Path:
        return root / os.path.expandvars(os.path.expanduser(name))

    interaction_file = require_file(path_of(g.interactions), "data.generic.interactions")
    item_file = require_file(path_of(g.items), "data.generic.items")
    expect = "columns user_id, item_id, timestamp[, rating, event] (data.generic.interactions)"
    raw = read_table(interaction_file, log, expect, "data.generic.interactions")
    _check_columns(raw, interaction_file, ["user_id", "item_id", "timestamp"], "data.generic.interactions")
    interactions = _interactions(raw, interaction_file, log, expect, strict=False)

    expect = "columns item_id, title[, genres, text fields, image] (data.generic.items)"
    raw_items = read_table(item_file, log, expect, "data.generic.items")
    _check_columns(raw_items, item_file, ["item_id", "title"], "data.generic.items")
    _check_columns(raw_items, item_file, g.item_text_fields, "data.generic.item_text_fields")
    genres = _split_genres(raw_items["genres"]) if "genres" in raw_items else [[] for _ in range(len(raw_items))]
    text = _attribute_dicts(raw_items, g.item_text_fields)
    items = _items(raw_items, item_file, log, expect, strict=False, genres=genres, text=text)
    if g.image_field:
        _check_columns(raw_items, item_file, [g.image_field], "data.generic.image_field")
        relative = _as_text(raw_items.loc[items.index, g.image_field])
        paths = [None if not isinstance(p, str) or not p else (item_file.parent / p).resolve() for p in relative]
        items["image"] = pd.Series([str(p) if p is not None and p.is_file() else None for p in paths],
                                   index=items.index, dtype=object)  # str dtype would turn None into NaN

    users = None
    if g.users:
        user_file = require_file(path_of(g.users), "data.generic.users")
        expect = "columns user_id[, attributes] (data.generic.users)"
        raw_users = read_table(user_file, log, expect, "data.generic.users")
        _check_columns(raw_users, user_file, ["user_id"], "data.generic.users")
        _check_columns(raw_users, user_file, g.user_fields, "data.generic.user_fields")
        fields = g.user_fields or [c for c in raw_users.columns if c not in ("user_id", "line")]
        users = _users(raw_users["user_id"], _attribute_dicts(raw_users, fields), raw_users["line"],
                       user_file, log, expect, strict=False)
    return interactions, items, users, _empty_tags()
