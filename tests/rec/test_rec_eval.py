"""The evaluation protocol on a real prepared dataset: saved targets, full catalog, history excluded."""
import json

import pytest
from helpers.generic_data import generic_cfg, write_generic_logs

from m6rec.data.prepare import prepare
from m6rec.rec.evaluate import EvalData, Popularity, evaluate, write_outputs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec")
    root = write_generic_logs(tmp / "logs", n_users=60, n_items=40, seed=3)
    with pytest.warns(UserWarning):
        prepare(generic_cfg(root, tmp / "ds").data)
    return EvalData.load(tmp / "ds")


def test_queries_follow_the_saved_split(dataset):
    s = dataset.splits
    for split in ("valid", "test"):
        qs = dataset.queries(split)
        assert len(qs) == s["user_id"].nunique()
        for q in qs[:20]:
            rows = s[s.user_id == q.user_id].sort_values("position")
            target_pos = rows[rows.split == split]["position"].item()
            assert q.target == rows[rows.split == split]["item_id"].item()
            assert q.history == rows[rows.position < target_pos]["item_id"].tolist()
    sub = dataset.queries("test", max_users=10, seed=1)
    assert len(sub) == 10 and sub == dataset.queries("test", max_users=10, seed=1)


def test_popularity_ranks_full_catalog_without_history(dataset, tmp_path):
    qs = dataset.queries("test")
    pop = Popularity(dataset)
    rankings = pop.rank(qs, 50)
    counts = dataset.train_counts()
    for q, r in zip(qs, rankings):
        assert not set(r) & set(q.history)
        assert set(r) <= set(dataset.catalog)
        assert len(r) == min(50, len(set(dataset.catalog) - set(q.history)))
        c = [counts.get(i, 0) for i in r]
        assert c == sorted(c, reverse=True)
    rep = evaluate(pop, dataset, qs, [1, 5, 10])
    assert 0 <= rep["hr@1"] <= rep["hr@5"] <= rep["hr@10"] <= 1
    write_outputs([rep], [1, 5, 10], tmp_path / "eval.json", {"split": "test"})
    assert json.loads((tmp_path / "eval.json").read_text())["results"][0]["model"] == "popularity"
    assert "| popularity |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_history_leak_is_caught(dataset):
    class Cheater:
        name = "cheater"

        def rank(self, queries, k):
            return [q.history[:k] for q in queries]

    with pytest.raises(AssertionError, match="history items"):
        evaluate(Cheater(), dataset, dataset.queries("test"), [1])
