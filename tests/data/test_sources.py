"""Readers (real MovieLens files and small generated ones) and cleaning."""
from __future__ import annotations

import gzip
import json
import math

import pandas as pd
import pytest

from m6rec.config import (
    ConfigError,
    DataConfig,
    FilterConfig,
    GenericSourceConfig,
    ImageConfig,
)
from m6rec.data import raw_files
from m6rec.data.sources import RawData, clean, load_source


def load(source: str, root, **kw) -> RawData:
    return load_source(DataConfig(source=source, root=str(root), **kw))


def user_attributes(raw: RawData, user_id: str) -> dict:
    return raw.users.set_index("user_id").at[user_id, "attributes"]


def item(raw: RawData, item_id: str) -> dict:
    return raw.items.set_index("item_id").loc[item_id].to_dict()


# --------------------------------------------------------------------------
# Real MovieLens files
# --------------------------------------------------------------------------
def test_ml100k_real(shared_data):
    raw = load("ml-100k", shared_data / "ml-100k")
    assert raw.counts["interactions"] == 100_000 and raw.counts["items"] == 1682 and raw.counts["users"] == 943
    assert raw.malformed == [] and raw.counts["malformed_rows"] == 0
    assert item(raw, "1")["title"] == "Toy Story (1995)"
    assert item(raw, "1")["genres"] == ["Animation", "Children's", "Comedy"]
    assert user_attributes(raw, "1") == {"age": "18-24", "gender": "male", "occupation": "technician", "zip": "85711"}
    first = raw.interactions.iloc[0]
    assert (first.user_id, first.item_id, first.timestamp, first.rating) == ("196", "242", 881250949, 3.0)


def test_ml1m_partial_real_with_posters(shared_data):
    root = shared_data / "ml-1m-partial"
    raw = load("ml-1m", root, images=ImageConfig(dir="posters"))
    assert raw.counts["interactions"] == 487_650 and raw.counts["items"] == 3883 and raw.counts["users"] == 6040
    assert raw.counts["items_with_image"] == 288 and raw.counts["malformed_rows"] == 0
    toy_story = item(raw, "1")
    assert toy_story["image"] == str((root / "posters" / "1.jpg").resolve())
    assert raw.interactions["user_id"].astype(int).max() == 2999  # the partial file: users 1-2999
    assert user_attributes(raw, "1") == {"age": "under 18", "gender": "female", "occupation": "K-12 student",
                                         "zip": "48067"}
    assert user_attributes(raw, "2")["age"] == "56+" and user_attributes(raw, "2")["occupation"] == "self-employed"


def test_ml_latest_small_real(shared_data):
    raw = load("ml-latest", shared_data / "ml-latest-small")
    assert raw.counts["interactions"] == 100_836 and raw.counts["items"] == 9742 and raw.counts["tags"] == 3683
    assert raw.counts["users"] == 610 and raw.counts["malformed_rows"] == 0
    no_genres = raw.items[raw.items["genres"].map(len) == 0]
    assert len(no_genres) > 0  # "(no genres listed)" became []
    assert list(raw.tags.columns) == ["user_id", "item_id", "tag"]
    assert item(raw, "11")["title"] == "American President, The (1995)"  # quoted, with a comma


def test_builtin_root_is_the_shipped_ml_latest_small():
    raw = load("ml-latest", "builtin:ml-latest-small")
    assert raw.counts["interactions"] == 100_836 and raw.counts["items"] == 9742
    with pytest.raises(ConfigError, match="no built-in dataset 'builtin:nope'"):
        load("ml-latest", "builtin:nope")


# --------------------------------------------------------------------------
# Generated MovieLens layouts
# --------------------------------------------------------------------------
GENRE_FLAGS = "|".join(["0"] * 19)


def write_ml100k(root):
    root.mkdir(exist_ok=True)
    (root / "u.data").write_text(
        "1\t10\t4\t100\n"
        "1\t11\t5\t100\n"
        "1\t10\n"  # line 3: too few fields
        "x\t10\t3\t101\n"  # line 4: non-integer user
        "2\t10\tgood\t102\n"  # line 5: non-numeric rating
        "2\t11\t3\t10.5\n"  # line 6: non-integer timestamp
        "\n"  # blank: skipped silently
        "2\t12\t2\t103\n"
    )
    flags_action = "|".join(["0", "1"] + ["0"] * 17)
    (root / "u.item").write_bytes(
        f"10|Café (1995)|01-Jan-1995||http://x|{flags_action}\n"
        f"11|Plain (1996)|01-Jan-1996||http://y|{GENRE_FLAGS}\n"
        f"12|Unknown genre|||http://z|1|{'|'.join(['0'] * 18)}\n".encode("latin-1")
    )
    (root / "u.user").write_text("1|17|F|writer|12345\n2|56|M|none|54321\n")


def test_ml100k_generated_with_malformed_lines(tmp_path):
    write_ml100k(tmp_path)
    raw = load("ml-100k", tmp_path)
    assert raw.interactions[["user_id", "item_id", "timestamp"]].values.tolist() == [
        ["1", "10", 100], ["1", "11", 100], ["2", "12", 103]]
    assert raw.interactions["order"].tolist() == [0, 1, 2]
    data = tmp_path / "u.data"
    assert raw.malformed == [
        f"{data}:3: expected 4 fields separated by tab, got 2",
        f"{data}:4: user_id is not an integer",
        f"{data}:6: timestamp is not an integer",
        f"{data}:5: rating is not a number",
    ]
    assert raw.counts["malformed_rows"] == 4
    assert item(raw, "10")["title"] == "Café (1995)" and item(raw, "10")["genres"] == ["Action"]
    assert item(raw, "12")["genres"] == []  # "unknown" means no genre
    assert user_attributes(raw, "1")["age"] == "under 18" and user_attributes(raw, "2")["age"] == "56+"
    assert user_attributes(raw, "1")["gender"] == "female"


def test_malformed_list_is_capped_but_every_row_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(raw_files, "MAX_LISTED_MALFORMED", 2)
    write_ml100k(tmp_path)
    raw = load("ml-100k", tmp_path)
    assert len(raw.malformed) == 2 and raw.counts["malformed_rows"] == 4


def write_ml1m(root, ratings_parts):
    root.mkdir(exist_ok=True)
    for name, text in ratings_parts.items():
        with gzip.open(root / name, "wt", encoding="latin-1") as f:
            f.write(text)
    movies = "1::Café au lait (1993)::Comedy|Drama\n2::Other (1994)::Horror\n"
    (root / "movies.dat").write_bytes(movies.encode("latin-1"))
    (root / "users.dat").write_text("1::F::25::20::11111\n2::M::1::0::22222\n3::M::99::4::33333\n")


def test_ml1m_generated_gzip_parts_and_posters(tmp_path):
    write_ml1m(tmp_path, {
        "ratings_users1-2.dat.gz": "1::1::5::978300760\n1::2::3::978300760\n2::1::4::978300761\n",
        "ratings_users3-3.dat.gz": "3::2::4::978300762\n3::9,bad::4::978300763\n",
    })
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "2.jpg").write_bytes(b"\xff\xd8\xff")
    raw = load("ml-1m", tmp_path, images=ImageConfig(dir="art"))
    assert raw.interactions["user_id"].tolist() == ["1", "1", "2", "3"]
    assert raw.interactions["order"].tolist() == [0, 1, 2, 3]  # file order runs on across the parts
    assert raw.malformed == [f"{tmp_path / 'ratings_users3-3.dat.gz'}:2: item_id is not an integer"]
    assert item(raw, "1")["title"] == "Café au lait (1993)" and item(raw, "1")["genres"] == ["Comedy", "Drama"]
    assert item(raw, "1")["image"] is None
    assert item(raw, "2")["image"] == str((tmp_path / "art" / "2.jpg").resolve())
    assert user_attributes(raw, "1") == {"age": "25-34", "gender": "female", "occupation": "writer", "zip": "11111"}
    assert user_attributes(raw, "2")["occupation"] == "other" and user_attributes(raw, "2")["age"] == "under 18"
    assert user_attributes(raw, "3")["age"] == "99"  # an unknown code is kept as given


def test_ml1m_plain_ratings_file_wins_over_parts(tmp_path):
    write_ml1m(tmp_path, {"ratings_part.dat.gz": "9::1::5::1\n"})
    (tmp_path / "ratings.dat").write_text("1::1::5::1\n")
    assert load("ml-1m", tmp_path).interactions["user_id"].tolist() == ["1"]


def test_ml_latest_generated_quotes_newlines_and_bad_utf8(tmp_path):
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n'
        '1,"Toy, The (1995)",Comedy\n'
        '2,"Two\nLines (1996)",(no genres listed)\n'  # a quoted value over two lines
        '3,Three (1997),Drama|War\n'
    )
    (tmp_path / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\n"
        b"1,1,4.0,10\n"
        b"1,2,\xff\xfe,11\n"  # line 3: not UTF-8
        b"1,3,3.5,12,extra\n"  # line 4: too many fields
        b"2,3,2.5,13\n"
    )
    (tmp_path / "tags.csv").write_text('userId,movieId,tag,timestamp\n1,1,"funny, smart",5\n1,x,bad,6\n')
    raw = load("ml-latest", tmp_path)
    assert item(raw, "1")["title"] == "Toy, The (1995)"
    assert item(raw, "2")["genres"] == [] and item(raw, "3")["genres"] == ["Drama", "War"]
    ratings = tmp_path / "ratings.csv"
    assert raw.malformed == [
        f"{ratings}:4: expected 4 fields separated by ',', got 5",
        f"{ratings}:3: not valid utf-8",
        f"{tmp_path / 'tags.csv'}:3: movieId is not an integer",
    ]
    assert raw.interactions["rating"].tolist() == [4.0, 2.5]
    assert raw.tags.values.tolist() == [["1", "1", "funny, smart"]]


def test_ml_latest_line_numbers_after_multiline_value(tmp_path):
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"A\nB\nC",Drama\n2,bad,row,x\nq,Q,Drama\n')
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4,1\n")
    raw = load("ml-latest", tmp_path)
    movies = tmp_path / "movies.csv"
    assert raw.malformed == [f"{movies}:5: expected 3 fields separated by ',', got 4",
                             f"{movies}:6: item_id is not an integer"]


# --------------------------------------------------------------------------
# Generic format
# --------------------------------------------------------------------------
INTERACTIONS = [
    {"user_id": "u1", "item_id": "a", "timestamp": "2020-01-01T00:00:00Z", "rating": 5.0, "event": "click"},
    {"user_id": "u1", "item_id": "b", "timestamp": "1577836860", "rating": None, "event": "buy"},
    {"user_id": "u2", "item_id": "a", "timestamp": "2020-01-01T00:02:00", "rating": 3.0, "event": None},
]
ITEMS = [
    {"item_id": "a", "title": "Alpha", "genres": "x|y", "blurb": "first", "img": "img/a.jpg"},
    {"item_id": "b", "title": "Beta", "genres": "", "blurb": None, "img": "img/missing.jpg"},
]
USERS = [{"user_id": "u1", "age": "30", "city": "Oslo"}, {"user_id": "u2", "age": None, "city": "Rome"}]


def write_generic(root, ext):
    root.mkdir(exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    (root / "img" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    for name, rows in (("interactions", INTERACTIONS), ("items", ITEMS), ("users", USERS)):
        path = root / f"{name}.{ext}"
        if ext == "jsonl":
            rows = [dict(r, genres=r["genres"].split("|") if r["genres"] else []) if "genres" in r else r
                    for r in rows]  # JSON gives genres as lists
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif ext == "csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        else:
            pd.DataFrame(rows).to_parquet(path, index=False)


def generic_config(ext, **kw) -> GenericSourceConfig:
    return GenericSourceConfig(interactions=f"interactions.{ext}", items=f"items.{ext}", users=f"users.{ext}",
                               item_text_fields=["blurb"], image_field="img", **kw)


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_generic_formats_read_alike(tmp_path, ext):
    write_generic(tmp_path, ext)
    raw = load("generic", tmp_path, generic=generic_config(ext))
    assert raw.malformed == []
    inter = raw.interactions
    assert inter["timestamp"].tolist() == [1577836800, 1577836860, 1577836920]
    assert inter["rating"].tolist()[0] == 5.0 and math.isnan(inter["rating"].tolist()[1])
    assert inter["event"].tolist() == ["click", "buy", None]
    assert str(inter["timestamp"].dtype) == "int64" and str(inter["rating"].dtype) == "float64"
    a, b = item(raw, "a"), item(raw, "b")
    assert a["genres"] == ["x", "y"] and b["genres"] == []
    assert a["text"] == {"blurb": "first"} and b["text"] == {}
    assert a["image"] == str((tmp_path / "img" / "a.jpg").resolve()) and b["image"] is None
    assert user_attributes(raw, "u1") == {"age": "30", "city": "Oslo"}
    assert user_attributes(raw, "u2") == {"city": "Rome"}


def test_generic_user_fields_and_no_users_file(tmp_path):
    write_generic(tmp_path, "csv")
    raw = load("generic", tmp_path, generic=generic_config("csv", user_fields=["city"]))
    assert user_attributes(raw, "u1") == {"city": "Oslo"}
    raw = load("generic", tmp_path, generic=GenericSourceConfig(interactions="interactions.csv", items="items.csv"))
    assert raw.users["user_id"].tolist() == ["u1", "u2"] and user_attributes(raw, "u1") == {}


def test_generic_tsv_without_rating_or_event(tmp_path):
    (tmp_path / "log.tsv").write_text("user_id\titem_id\ttimestamp\n7\t1\t1700000000.9\n7\t2\t2023-11-14\n")
    (tmp_path / "items.csv").write_text("item_id,title\n1,One\n2,Two\n")
    raw = load("generic", tmp_path, generic=GenericSourceConfig(interactions="log.tsv"))
    assert raw.interactions["timestamp"].tolist() == [1700000000, 1699920000]  # floats floored; dates at 00:00 UTC
    assert raw.interactions["rating"].isna().all() and raw.interactions["event"].tolist() == [None, None]
    assert raw.interactions["item_id"].tolist() == ["1", "2"] and raw.malformed == []


def test_generic_malformed_rows(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"item_id": "a", "title": "A"}\n{"item_id": "a", "title": "again"}\n')
    (tmp_path / "interactions.jsonl").write_text(
        '{"user_id": "u1", "item_id": "a", "timestamp": 1}\n'
        '{"user_id": "u1", "item_id": "a", "timestamp": \n'  # line 2: broken JSON
        '{"user_id": "", "item_id": "a", "timestamp": 2}\n'  # line 3: empty user
        '{"user_id": "u1", "item_id": "a", "timestamp": "yesterday"}\n'  # line 4: bad time
        '{"user_id": "u1", "item_id": "a", "timestamp": 3, "rating": "great"}\n'  # line 5
        '[1, 2]\n'  # line 6: not an object
    )
    raw = load("generic", tmp_path, generic=GenericSourceConfig(interactions="interactions.jsonl",
                                                                items="items.jsonl"))
    inter, items_path = tmp_path / "interactions.jsonl", tmp_path / "items.jsonl"
    assert sorted(raw.malformed) == sorted([
        f"{inter}:2: not valid JSON (Expecting value)",
        f"{inter}:6: not a JSON object",
        f"{inter}:3: user_id is empty",
        f"{inter}:4: timestamp is not a number or ISO-8601 time",
        f"{inter}:5: rating is not a number",
        f"{items_path}:2: duplicate item_id (the first row is kept)",
    ])
    assert len(raw.interactions) == 1 and item(raw, "a")["title"] == "A"


# --------------------------------------------------------------------------
# Errors that stop a run
# --------------------------------------------------------------------------
def test_missing_files_name_the_config_key(tmp_path):
    write_ml100k(tmp_path)
    (tmp_path / "u.data").unlink()
    with pytest.raises(ConfigError, match=r"'data\.root'.*u\.data"):
        load("ml-100k", tmp_path)
    with pytest.raises(ConfigError, match=r"'data\.root'.*ratings\.dat"):
        load("ml-1m", tmp_path)
    with pytest.raises(ConfigError, match=r"'data\.generic\.interactions'.*interactions\.csv"):
        load("generic", tmp_path)
    with pytest.raises(ConfigError, match=r"'data\.root': directory not found"):
        load("ml-100k", tmp_path / "nowhere")
    write_ml100k(tmp_path)
    with pytest.raises(ConfigError, match=r"'data\.images\.dir': directory not found"):
        load("ml-100k", tmp_path, images=ImageConfig(dir="posters"))


def test_root_expands_env_vars(tmp_path, monkeypatch):
    write_ml100k(tmp_path)
    monkeypatch.setenv("M6REC_TEST_ROOT", str(tmp_path))
    assert load("ml-100k", "$M6REC_TEST_ROOT").counts["interactions"] == 3


def test_wrong_delimiter_is_a_clear_error(tmp_path):
    write_ml1m(tmp_path, {})
    (tmp_path / "ratings.dat").write_text("1,1,5,978300760\n2,1,4,978300761\n")
    with pytest.raises(ConfigError, match=r"ratings\.dat: none of its 2 rows.*separated by commas.*UserID::MovieID"):
        load("ml-1m", tmp_path)

    write_generic(tmp_path, "csv")
    pd.DataFrame(INTERACTIONS).to_csv(tmp_path / "interactions.csv", sep="\t", index=False)
    with pytest.raises(ConfigError, match=r"interactions\.csv lacks column.*separated by tabs"):
        load("generic", tmp_path, generic=generic_config("csv"))

    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,a,soon\nu2,a,later\n")
    with pytest.raises(ConfigError, match=r"none of its 2 rows.*line 2: timestamp"):
        load("generic", tmp_path, generic=generic_config("csv"))


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------
def raw_from(rows, item_ids) -> RawData:
    """rows: (user, item, timestamp, rating) in file order."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    inter["event"] = None
    inter["order"] = range(len(inter))
    items = pd.DataFrame({"item_id": item_ids, "title": item_ids})
    users = pd.DataFrame({"user_id": sorted(inter["user_id"].unique())})
    return RawData(inter, items, users, pd.DataFrame(columns=["user_id", "item_id", "tag"]))


def test_clean_counts_each_step_and_breaks_ties_by_file_order():
    raw = raw_from([
        ("u1", "b", 3, 4.0),
        ("u1", "c", 5, 4.0),
        ("u1", "a", 5, 4.0),  # same timestamp as "c": stays after it (file order)
        ("u1", "a", 5, 4.0),  # exact duplicate
        ("u1", "zz", 1, 5.0),  # unknown item
        ("u2", "a", 1, 5.0),
        ("u2", "b", 2, 5.0),
        ("u2", "c", 3, 5.0),
        ("u2", "d", 4, 5.0),  # item d has one interaction: dropped by the 2-core
        ("u2", "e", 5, 1.0),  # below min_rating
        ("u3", "c", 2, 5.0),
        ("u3", "a", 1, 5.0),  # u3 has 2 < 3 interactions
    ], ["a", "b", "c", "d", "e", "never"])
    cleaned = clean(raw, FilterConfig(min_rating=2.0, kcore=2, min_user_interactions=3))
    r = cleaned.report
    assert r["duplicates_removed"] == 1 and r["unknown_items_removed"] == 1 and r["below_min_rating_removed"] == 1
    assert r["kcore_removed"] == 1 and r["kcore_removed_items"] == 1 and r["kcore_removed_users"] == 0
    assert r["short_users_removed"] == 1 and r["short_user_interactions_removed"] == 2
    inter = cleaned.interactions
    assert inter[["user_id", "item_id"]].values.tolist() == [
        ["u1", "b"], ["u1", "c"], ["u1", "a"], ["u2", "a"], ["u2", "b"], ["u2", "c"]]
    assert r["interactions"] == 6 and r["timestamp_ties"] == 2
    assert len(cleaned.items) == 6 and r["items_with_interactions"] == 3  # the catalog is kept whole


def test_kcore_iterates_until_stable():
    # round 1 drops item x (1 interaction), leaving u3 with one; round 2 drops u3,
    # leaving item y with one; round 3 drops y
    raw = raw_from([("u1", i, t, 1.0) for t, i in enumerate("abcy")] + [("u2", i, t, 1.0) for t, i in enumerate("abc")]
                   + [("u3", "x", 1, 1.0), ("u3", "y", 2, 1.0)], ["a", "b", "c", "x", "y"])
    cleaned = clean(raw, FilterConfig(kcore=2))
    report = cleaned.report
    assert report["kcore_rounds"] == 3 and report["kcore_removed"] == 3
    assert report["kcore_removed_users"] == 1 and report["kcore_removed_items"] == 2
    assert cleaned.interactions["item_id"].tolist() == ["a", "b", "c", "a", "b", "c"]


def test_clean_error_names_the_filter_that_emptied_it():
    raw = raw_from([("u1", "a", 1, 1.0), ("u1", "b", 2, 2.0), ("u1", "a", 3, 1.0)], ["a", "b"])
    with pytest.raises(ConfigError, match=r"data\.filters\.min_rating=4\.0"):
        clean(raw, FilterConfig(min_rating=4.0))
    with pytest.raises(ConfigError, match=r"data\.filters\.min_user_interactions=4"):
        clean(raw, FilterConfig(min_user_interactions=4))
    with pytest.raises(ConfigError, match=r"not in the item catalog"):
        clean(raw_from([("u1", "q", 1, 1.0)], ["a"]), FilterConfig())


def test_clean_real_ml100k_with_filters(shared_data):
    cleaned = clean(load("ml-100k", shared_data / "ml-100k"), FilterConfig(min_rating=4.0, kcore=5))
    inter = cleaned.interactions
    assert (inter["rating"] >= 4).all()
    assert inter.groupby("user_id").size().min() >= 5
    assert cleaned.report["below_min_rating_removed"] == 44_625  # ratings 1-3
    keys = inter[["user_id", "timestamp", "order"]]
    assert keys.equals(keys.sort_values(["user_id", "timestamp", "order"]).reset_index(drop=True))
