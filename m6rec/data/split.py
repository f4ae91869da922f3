"""Chronological leave-one-out split (docs/architecture.md, "Split").

Per user the last interaction is ``test``, the second-last ``valid`` and the
rest ``train``.  The timeline order is the one ``sources.clean()`` produced
(user, timestamp, file order); ``leave_one_out`` checks it rather than
re-sorting, so the split always agrees with the order the text windows use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


def leave_one_out(interactions: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``interactions`` with ``position`` (0-based in the user's timeline) and ``split``.

    Users with two interactions get no train row and users with one only a test
    row; ``clean()`` with ``min_user_interactions >= 3`` leaves none such.
    """
    users = interactions["user_id"]
    new_user = users.ne(users.shift()).to_numpy()  # first row of each run of one user
    going_back = np.diff(interactions["timestamp"].to_numpy()) < 0
    if new_user.sum() != users.nunique() or (going_back & ~new_user[1:]).any():
        raise ValueError("leave_one_out needs each user's interactions together and in time order (use clean())")
    out = interactions.copy()
    position = users.groupby(users, sort=False).cumcount()
    remaining = users.groupby(users, sort=False).cumcount(ascending=False)  # interactions after this one
    out["position"] = position.astype("int64")
    out["split"] = np.select([remaining == 0, remaining == 1], ["test", "valid"], "train")
    return out


def leaked_pairs(split_df: pd.DataFrame) -> pd.DataFrame:
    """Valid/test rows whose (user_id, item_id) also appears among that user's train rows.

    Empty for MovieLens (one rating per user and item); generic logs with repeat
    consumption may legitimately have some.
    """
    train = split_df.loc[split_df["split"] == "train", ["user_id", "item_id"]].drop_duplicates()
    held_out = split_df[split_df["split"] != "train"]
    hit = held_out.merge(train, on=["user_id", "item_id"], how="left", indicator=True)["_merge"] == "both"
    return held_out[hit.to_numpy()]


def save_split(split_df: pd.DataFrame, path: str | Path) -> None:
    """Write parquet atomically: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        split_df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_split(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)
