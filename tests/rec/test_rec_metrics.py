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


def test_top_k_excluding_equals_a_full_stable_sort_ties_and_exclusions_included():
    """The partition-then-sort top k returns what sorting the whole catalog returns -- ties broken by
    catalog order, excluded items skipped -- on scores full of ties."""
    import numpy as np

    from m6rec.rec.evaluate import top_k_excluding

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(5, 300))
        scores = rng.integers(0, 6, n).astype(np.float32)  # few distinct values: many ties
        catalog = np.array([f"i{j}" for j in range(n)], dtype=object)
        exclude = set(rng.choice(catalog, int(rng.integers(0, min(n, 20))), replace=False).tolist())
        k = int(rng.integers(1, 15))
        order = np.argsort(-scores, kind="stable")
        expected = [catalog[j] for j in order if catalog[j] not in exclude][:k]
        assert top_k_excluding(scores, catalog, exclude, k) == expected, trial
