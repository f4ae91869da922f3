"""Windows, templates and segment encoding, on hand-built timelines."""
import numpy as np
import pandas as pd
import pytest

from m6rec.config import TextConfig
from m6rec.data import text as T
from m6rec.data.tokenizer import SegmentEncoder, train_tokenizer


def splits_for(n_train):
    return np.array(["train"] * n_train + ["valid", "test"])


def test_windows_predict_each_training_item_once():
    n = 25
    ws = T.make_windows("7", splits_for(n), max_items=10, stride=4, min_context_items=1)
    train = [w for w in ws if w.split == "train"]
    targets = [int(r) for w in train for r in w.rows[w.n_context :]]
    assert targets == list(range(1, n))  # every training item but the first, once, in order
    assert all(len(w.rows) <= 10 for w in ws)
    # later windows keep as much history as fits
    assert [(int(w.rows[0]), int(w.rows[-1]) + 1, w.n_context) for w in train[:3]] == [(0, 10, 1), (4, 14, 6), (8, 18, 6)]


def test_valid_and_test_windows_hold_only_their_target():
    ws = T.make_windows("7", splits_for(5), max_items=4, stride=2, min_context_items=1)
    valid = [w for w in ws if w.split == "valid"]
    test = [w for w in ws if w.split == "test"]
    assert len(valid) == len(test) == 1
    assert list(valid[0].rows) == [2, 3, 4, 5] and valid[0].n_context == 3  # row 5 = valid target
    assert list(test[0].rows) == [3, 4, 5, 6] and test[0].n_context == 3  # row 6 = test target
    train_rows = {int(r) for w in ws if w.split == "train" for r in w.rows}
    assert 5 not in train_rows and 6 not in train_rows


def test_short_user_has_no_training_window_but_keeps_eval_windows():
    ws = T.make_windows("1", splits_for(1), max_items=5, stride=2, min_context_items=1)
    assert [w.split for w in ws] == ["valid", "test"]


def _catalog(cfg):
    items = pd.DataFrame(
        {
            "item_id": ["1", "2", "3"],
            "title": ["Toy Story (1995)", "Heat (1995)", "Café Society (2016)"],
            "genres": [["Animation", "Comedy"], ["Action"], []],
            "text": [{}, {}, {}],
            "image": ["/p/1.jpg", None, None],
        }
    )
    users = pd.DataFrame({"user_id": ["u"], "attributes": [{"age": "25-34", "gender": "female", "occupation": "writer"}]})
    tags = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["2", "2"], "tag": ["tense", "heist"]})
    return T.build_catalog(items, users, tags, cfg)


def test_rendered_text_and_regions():
    cfg = TextConfig()
    cat = _catalog(cfg)
    w = T.Window("u", "train", 0, np.arange(3), 1)
    segs = T.window_segments(
        w, np.array(["1", "2", "3"]), np.array([0, 3 * 86400, 3 * 86400 + 10]), np.array([5.0, 4.5, np.nan]), cat, cfg
    )
    text = T.segments_text(segs)
    assert text == (
        "<|bos|><|context|>User: age: 25-34, gender: female, occupation: writer."
        "<|item|><|image|>Toy Story (1995) (Animation, Comedy), rated 5"
        "<|predict|><|item|>Heat (1995) (Action), rated 4.5, tagged tense, heist, 3 days later"
        "<|item|>Café Society (2016), same day<|eos|>"
    )
    tok = train_tokenizer([text.replace("<|", " ").replace("|>", " ")] * 3, 400, 1, [])
    enc = SegmentEncoder(tok, image_patches=4)
    ids, mask = enc.encode(segs)
    assert ids.dtype == np.uint16 and mask.dtype == np.uint8 and len(ids) == len(mask)
    img = np.flatnonzero(mask & T.MASK_IMAGE)
    assert len(img) == 4 and np.all(np.diff(img) == 1)  # one run of P slots
    assert np.all(ids[img] == tok.token_to_id(T.IMAGE))
    assert np.all(mask[img] & T.MASK_CONTEXT) and not np.any(mask[img] & T.MASK_LOSS)
    predict = int(np.flatnonzero(ids == tok.token_to_id(T.PREDICT))[0])
    assert np.all(mask[: predict + 1] & T.MASK_CONTEXT) and not np.any(mask[: predict + 1] & T.MASK_LOSS)
    assert np.all(mask[predict + 1 :] == T.MASK_LOSS)
    # an item title encodes to the same ids in every window (the trie relies on it)
    heat = tok.encode("Heat (1995) (Action)", add_special_tokens=False).ids
    assert any(list(ids[i : i + len(heat)]) == heat for i in range(len(ids)))
    assert tok.decode(ids.tolist(), skip_special_tokens=False).count("<|item|>") == 3


@pytest.mark.parametrize("repr_", ["token", "both"])
def test_item_token_modes(repr_):
    cfg = TextConfig(item_repr=repr_, images=False)
    cat = _catalog(cfg)
    w = T.Window("u", "test", 0, np.arange(2), 1)
    text = T.segments_text(T.window_segments(w, np.array(["1", "2"]), np.array([0, 0]), np.array([1.0, 2.0]), cat, cfg))
    assert "<item_1>" in text and "<item_2>" in text
    assert ("Toy Story" in text) == (repr_ == "both")


def test_random_context_keeps_targets_and_varies_history():
    splits = splits_for(200)
    full = T.make_windows("9", splits, max_items=20, stride=5, min_context_items=2)
    rnd = T.make_windows("9", splits, max_items=20, stride=5, min_context_items=2, rng=np.random.default_rng(0))
    targets = lambda ws: [int(r) for w in ws if w.split == "train" for r in w.rows[w.n_context:]]
    assert targets(rnd) == targets(full) == list(range(2, 200))
    ctx = [w.n_context for w in rnd if w.split == "train"][1:]
    assert min(ctx) >= 2 and max(ctx) <= 15 and len(set(ctx)) > 5  # varied, within bounds
    for w in rnd:  # the history kept is the most recent one: rows stay contiguous
        assert np.all(np.diff(w.rows) == 1)
    assert [(w.split, list(w.rows)) for w in rnd if w.split != "train"] == [
        (w.split, list(w.rows)) for w in full if w.split != "train"]  # eval windows keep full history


def test_token_mode_writes_ratings_in_words_and_the_id_baseline_does_not():
    items = np.array(["a", "b", "c"], dtype=object)
    ts = np.array([0, 0, 86400 * 3])
    ratings = np.array([4.0, 2.0, 5.0])
    cat = T.Catalog({"a": "A (X)", "b": "B (Y)", "c": "C (Z)"}, {}, {"7": "User: age: 30."})
    w = T.Window("7", "train", 0, np.arange(3), 1)
    rated = TextConfig(item_repr="token", user_fields=["age"], images=False)
    text = T.segments_text(T.window_segments(w, items, ts, ratings, cat, rated))
    assert text == ("<|bos|><|context|>User: age: 30.<|item|><item_a>, rated 4<|predict|><|item|><item_b>, rated 2, "
                    "same day<|item|><item_c>, rated 5, 3 days later<|eos|>")
    id_only = TextConfig(item_repr="token", profile_template="", rating_template="", time_unit="none", images=False)
    cat.profiles = {}  # build_catalog renders no profile sentence with an empty profile_template
    text = T.segments_text(T.window_segments(w, items, ts, ratings, cat, id_only))
    assert text == "<|bos|><|context|><|item|><item_a><|predict|><|item|><item_b><|item|><item_c><|eos|>"
