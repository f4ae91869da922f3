"""Recommendation metrics against hand-computed cases."""
import math

import pytest

from m6rec.rec import metrics as M


def test_ranks_hr_ndcg_mrr_by_hand():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "d"]]
    targets = ["b", "c", "a"]  # ranks 2, 1, absent
    ranks = M.target_ranks(rankings, targets)
    assert list(ranks[:2]) == [2, 1] and math.isinf(ranks[2])
    assert M.hit_rate(ranks, 1) == pytest.approx(1 / 3)
    assert M.hit_rate(ranks, 2) == pytest.approx(2 / 3)
    assert M.ndcg(ranks, 1) == pytest.approx(1 / 3)
    assert M.ndcg(ranks, 3) == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert M.mrr(ranks) == pytest.approx((0.5 + 1 + 0) / 3)


def test_coverage_and_diversity_by_hand():
    rankings = [["a", "b"], ["a", "c"]]
    assert M.catalog_coverage(rankings, 1, 4) == pytest.approx(1 / 4)
    assert M.catalog_coverage(rankings, 2, 4) == pytest.approx(3 / 4)
    genres = {"a": {"x", "y"}, "b": {"y"}, "c": {"z"}}
    # user 1: a vs b: jaccard 1/2 -> distance 1/2; user 2: a vs c: distance 1
    assert M.intra_list_diversity(rankings, 2, genres) == pytest.approx(0.75)


def test_head_items_and_report_split():
    counts = {"a": 10, "b": 5, "c": 1, "d": 1, "e": 1}
    assert M.head_items(counts, 0.4) == {"a", "b"}
    rep = M.ranking_report([["a"], ["x"]], ["a", "c"], [1], catalog_size=5, head={"a", "b"})
    assert rep["hr@1_head"] == 1.0 and rep["hr@1_tail"] == 0.0 and rep["head_targets"] == 1


def test_auc_and_logloss_by_hand():
    # pairs (pos, neg): (0.9,0.1) win, (0.9,0.5) win, (0.4,0.1) win, (0.4,0.5) loss -> 3/4
    assert M.auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]) == pytest.approx(0.75)
    assert M.auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))
    assert M.log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
