"""The packing plan, pure and without I/O: first-fit-decreasing rows of ``seq_len`` tokens and
shards assigned to (rank, worker) slots.  The stream's simulation of an epoch and its reader
both call these, which is what makes "computed up front" and "what is actually read" agree."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def first_fit_decreasing(lengths: np.ndarray, seq_len: int, assign: bool):
    """First-fit-decreasing of ``lengths`` (each 1..seq_len) into bins of ``seq_len``.

    Items are placed longest first, ties in input order.  Returns ``(row_of,
    n_rows, order)``: the row of each item (None unless ``assign``), the number
    of rows and the placement order.

    Equal-length items are placed as a group: under first fit, consecutive
    identical items fill the lowest open row that fits until it no longer
    does, then the next one, then open new rows, so a group is a few vector
    operations instead of one scan per item.  The result is exactly the
    item-by-item first fit (tests check this), at a cost that grows with the
    number of *distinct* lengths (<= seq_len), which keeps the whole-epoch
    simulation cheap.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    srt = lengths[order]
    row_of = np.empty(n, dtype=np.int64) if assign else None
    caps = np.empty(n, dtype=np.int64)  # remaining capacity of each open row
    n_rows = 0
    lo = 0  # rows below lo cannot take even the shortest item again: never scanned
    smallest = int(srt[-1]) if n else 0
    change = np.flatnonzero(np.diff(srt)) + 1
    for st, en in zip(np.concatenate([[0], change]), np.concatenate([change, [n]])):
        if en <= st:
            continue
        size, count, pos = int(srt[st]), int(en - st), int(st)
        while lo < n_rows and caps[lo] < smallest:
            lo += 1
        if lo < n_rows:
            fit = caps[lo:n_rows] // size  # how many of this size each open row still takes
            cum = np.cumsum(fit)
            if cum[-1] > 0:
                if cum[-1] >= count:
                    last = int(np.searchsorted(cum, count))  # first row where the group is used up
                    take = fit[: last + 1].copy()
                    take[last] -= cum[last] - count
                else:
                    take = fit
                placed = int(take.sum())
                caps[lo : lo + len(take)] -= take * size
                if assign:
                    row_of[order[pos : pos + placed]] = np.repeat(np.arange(lo, lo + len(take)), take)
                pos += placed
                count -= placed
        if count:  # nothing open fits: open new rows, each filled with as many as fit
            per = seq_len // size
            n_new = -(-count // per)
            take = np.full(n_new, per, dtype=np.int64)
            take[-1] = count - per * (n_new - 1)
            caps[n_rows : n_rows + n_new] = seq_len - take * size
            if assign:
                row_of[order[pos : pos + count]] = np.repeat(np.arange(n_rows, n_rows + n_new), take)
            n_rows += n_new
    return row_of, n_rows, order


def ffd_pack(lengths: Sequence[int], seq_len: int) -> list[np.ndarray]:
    """Pack items into rows of ``seq_len`` tokens, first-fit-decreasing.

    ``lengths`` are token counts (longer ones count as ``seq_len``: they are
    truncated); returns the rows, each an array of item indices in placement
    order.  Deterministic: ties go in input order.
    """
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), seq_len)
    if len(lengths) == 0:
        return []
    if lengths.min() <= 0:
        raise ValueError("ffd_pack: every length must be >= 1")
    row_of, n_rows, order = first_fit_decreasing(lengths, seq_len, assign=True)
    rows_in_placement = row_of[order]
    placed = order[np.argsort(rows_in_placement, kind="stable")]
    return np.split(placed, np.cumsum(np.bincount(rows_in_placement, minlength=n_rows))[:-1])


def assign_shards(tokens: Sequence[int], num_slots: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Give shards to slots: permute (seeded by (seed, epoch)), then greedily to the lightest slot.

    Greedy by tokens keeps slot loads within about one shard of each other
    even when shard sizes are very uneven, which is what keeps the "drop"
    policy's losses small.  Ties go to the lowest slot index, so every rank
    computes the same assignment.
    """
    n = len(tokens)
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    load = np.zeros(num_slots, dtype=np.int64)
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    for s in order:
        k = int(np.argmin(load))  # argmin returns the first minimum: lowest slot index on ties
        slots[k].append(int(s))
        load[k] += int(tokens[s])
    return slots
