"""Chronological leave-one-out split."""
from __future__ import annotations

import pandas as pd
import pytest

from m6rec.config import DataConfig, FilterConfig
from m6rec.data.sources import clean, load_source
from m6rec.data.split import leaked_pairs, leave_one_out, load_split, save_split


def timeline(rows) -> pd.DataFrame:
    """rows: (user, item, timestamp), already in clean() order."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    df["order"] = range(len(df))
    return df


def test_last_is_test_second_last_is_valid():
    split = leave_one_out(timeline([("a", "1", 1), ("a", "2", 2), ("a", "3", 2), ("a", "4", 9),
                                    ("b", "1", 5), ("b", "5", 6), ("b", "2", 7)]))
    assert split["position"].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert split["split"].tolist() == ["train", "train", "valid", "test", "train", "valid", "test"]
    assert split["item_id"].tolist() == ["1", "2", "3", "4", "1", "5", "2"]  # rows keep their order


def test_short_users_and_empty_input():
    split = leave_one_out(timeline([("a", "1", 1), ("a", "2", 2), ("b", "1", 1)]))
    assert split["split"].tolist() == ["valid", "test", "test"]
    assert leave_one_out(timeline([])).empty


def test_unsorted_input_is_refused():
    with pytest.raises(ValueError, match="time order"):
        leave_one_out(timeline([("a", "1", 5), ("a", "2", 1), ("a", "3", 6)]))
    with pytest.raises(ValueError, match="together"):
        leave_one_out(timeline([("a", "1", 1), ("b", "2", 1), ("a", "3", 2)]))


def test_leaked_pairs_finds_repeats():
    split = leave_one_out(timeline([("a", "1", 1), ("a", "2", 2), ("a", "1", 3)]))
    assert leaked_pairs(split)[["user_id", "item_id", "split"]].values.tolist() == [["a", "1", "test"]]


def test_real_ml100k_split_and_parquet_round_trip(shared_data, tmp_path):
    raw = load_source(DataConfig(source="ml-100k", root=str(shared_data / "ml-100k")))
    split = leave_one_out(clean(raw, FilterConfig()).interactions)
    by_user = split.groupby("user_id", sort=False)
    assert (split["split"] == "test").sum() == 943 and (split["split"] == "valid").sum() == 943
    last = by_user.tail(1)
    second_last = by_user.nth(-2)
    assert (last["split"] == "test").all() and (second_last["split"] == "valid").all()
    # the test item is the user's latest, ties going to the later file row
    latest = split.sort_values(["user_id", "timestamp", "order"]).groupby("user_id").tail(1)
    assert set(latest.index) == set(last.index)
    assert leaked_pairs(split).empty

    path = tmp_path / "splits.parquet"
    save_split(split, path)
    assert [p.name for p in tmp_path.iterdir()] == ["splits.parquet"]  # no temporary file left
    loaded = load_split(path)
    assert loaded.equals(split)
