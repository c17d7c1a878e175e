"""The generated demo dataset: shape, determinism, cold items, and that text predicts behaviour."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from learn.config import ConfigError, DemoConfig
from learn.data.demo import DEFAULT_TEMPLATE, generate_demo
from learn.data.schema import render_texts
from learn.data.sequences import build_sequences, leave_one_out

CFG = DemoConfig()


@pytest.fixture(scope="module")
def demo():
    ds = generate_demo(CFG)
    data = build_sequences(ds, render_texts(ds.items, ds.default_template))
    return ds, data, leave_one_out(data)


def _hit_rate_at_10(scores_for, split, rows=None) -> float:
    """Share of evaluated users (or of ``rows``) whose target ranks in the top 10 of all items;
    history items are excluded and ties count against the target."""
    hits = []
    for r in range(len(split)) if rows is None else rows:
        hist, target = split.histories[r], split.targets[r]
        s = scores_for(hist).astype(float)
        s[hist] = -np.inf
        hits.append((s >= s[target]).sum() - 1 < 10)
    return float(np.mean(hits))


def _tfidf(texts: list[str]) -> np.ndarray:
    """Row-normalised TF-IDF vectors over lower-case word tokens."""
    vocab: dict[str, int] = {}
    rows = [[vocab.setdefault(w, len(vocab)) for w in re.findall(r"\w+", t.lower())] for t in texts]
    x = np.zeros((len(texts), len(vocab)))
    for i, r in enumerate(rows):
        np.add.at(x[i], r, 1.0)
    x *= np.log(len(texts) / (x > 0).sum(0))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_tables_have_the_expected_columns_types_and_ids(demo):
    ds, _, _ = demo
    items, inter = ds.items, ds.interactions
    assert list(items.columns) == ["item_id", "title", "brand", "category", "price"]
    assert list(inter.columns) == ["user_id", "item_id", "timestamp"]
    for col in items.columns:
        assert pd.api.types.is_string_dtype(items[col]), col
    assert pd.api.types.is_string_dtype(inter["user_id"]) and pd.api.types.is_string_dtype(inter["item_id"])
    assert inter["timestamp"].dtype == np.int64
    assert len(items) == CFG.num_items and items["item_id"].is_unique
    assert items["item_id"].str.fullmatch(r"D\d{6}").all()
    assert inter["user_id"].nunique() == CFG.num_users
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert items["category"].nunique() == CFG.num_categories
    assert items["category"].str.fullmatch(r"[^>]+ > [^>]+").all()
    assert (items["price"].str.fullmatch(r"\d+\.\d{2}") & (items["price"].astype(float) > 0)).all()
    assert ds.default_template == DEFAULT_TEMPLATE == "Title: {title}. Brand: {brand}. Category: {category}"
    assert ds.drops.total == 0


def test_every_item_has_text_and_titles_share_vocabulary(demo):
    ds, _, _ = demo
    texts = render_texts(ds.items, ds.default_template)
    assert texts.notna().all() and (texts.str.len() > 0).all()
    for col in ("title", "brand", "category"):
        assert (ds.items[col].str.strip().str.len() > 0).all(), col
    assert ds.items["title"].is_unique
    # the brand is part of the title, and words recur across items (similar items share words)
    assert all(b in t for b, t in zip(ds.items["brand"], ds.items["title"]))
    words = pd.Series([w for t in ds.items["title"] for w in set(t.split())]).value_counts()
    assert (words >= 5).sum() >= 50


def test_sequences_are_long_enough_ordered_and_interleaved(demo):
    ds, data, _ = demo
    lengths = np.array([len(s) for s in data.seqs])
    assert lengths.min() >= 5 and lengths.max() <= 40
    assert 7.0 <= lengths.mean() <= 12.0 and np.median(lengths) < lengths.mean()  # skewed short
    for seq, ts in zip(data.seqs, data.times):
        assert (np.diff(ts) > 0).all()  # strictly increasing per user
        assert len(set(seq.tolist())) == len(seq)  # no repeats within a user
    ts = ds.interactions["timestamp"].to_numpy()
    assert (np.diff(ts) >= 0).all()  # one global clock
    span_days = (ts.max() - ts.min()) / 86_400
    assert 500 <= span_days <= 731
    # users interleave: many users are active on both sides of the global median time
    cut = np.median(ts)
    both = sum(1 for t in data.times if t[0] < cut <= t[-1])
    assert both > 0.2 * CFG.num_users


def test_same_seed_gives_identical_tables_and_other_seeds_differ():
    a, b = generate_demo(CFG), generate_demo(DemoConfig())
    for name in ("items", "interactions"):
        fa, fb = getattr(a, name), getattr(b, name)
        assert fa.to_csv(index=False).encode() == fb.to_csv(index=False).encode()
        assert (fa.dtypes == fb.dtypes).all()
    c = generate_demo(DemoConfig(seed=1))
    assert not a.items.equals(c.items)
    assert not a.interactions.equals(c.interactions)


def test_exactly_the_cold_items_appear_only_as_valid_or_test_targets(demo):
    _, data, splits = demo
    pop = splits.train_popularity(data.num_items)
    targets = np.concatenate([splits.valid.targets, splits.test.targets])
    cold_targets = set(np.unique(targets[pop[targets] == 0]).tolist())
    assert len(cold_targets) == CFG.cold_items
    # every item that occurs at all occurs in training, unless it is one of the cold items
    seen = set(np.concatenate(data.seqs).tolist())
    assert {i for i in seen if pop[i] == 0} == cold_targets
    assert not cold_targets & set(np.concatenate(splits.train).tolist())


def test_content_of_the_last_item_predicts_the_next_one(demo):
    ds, data, splits = demo
    x = _tfidf((ds.items["title"] + " " + ds.items["category"]).tolist())
    pop = splits.train_popularity(data.num_items)
    content = _hit_rate_at_10(lambda h: x @ x[h[-1]], splits.test)
    popular = _hit_rate_at_10(lambda h: pop.copy(), splits.test)
    random_rate = 10 / data.num_items
    print(f"HR@10 content={content:.3f} popularity={popular:.3f} random={random_rate:.3f}")
    assert content >= 3 * random_rate
    assert content > popular
    assert popular > random_rate  # popularity skew exists, it just does not explain the signal
    # cold targets are as content-predictable as the rest
    cold_rows = [i for i, t in enumerate(splits.test.targets) if pop[t] == 0]
    assert len(cold_rows) >= 10
    assert _hit_rate_at_10(lambda h: x @ x[h[-1]], splits.test, cold_rows) >= 3 * random_rate


def test_small_and_large_configs():
    ds = generate_demo(DemoConfig(num_items=60, num_users=50, num_categories=25, cold_items=0, seed=3))
    assert ds.items["category"].nunique() == 25 and len(ds.items) == 60
    assert ds.interactions.groupby("user_id").size().min() >= 5
    data = build_sequences(ds, render_texts(ds.items, ds.default_template))
    splits = leave_one_out(data)
    targets = np.concatenate([splits.valid.targets, splits.test.targets])
    assert (splits.train_popularity(data.num_items)[targets] > 0).all()  # no cold items asked for


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_items": 5}, "num_items"),
        ({"num_categories": 0}, "num_categories"),
        ({"num_users": 0}, "num_users"),
        ({"cold_items": 400}, "cold_items"),
        ({"cold_items": -1}, "cold_items"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"data.demo.{key}"):
        generate_demo(DemoConfig(**kwargs))


def test_writes_parquet(tmp_path, demo):
    ds, _, _ = demo
    items_path, inter_path = ds.write_parquet(tmp_path)
    back = pd.read_parquet(inter_path)
    assert back["timestamp"].dtype == np.int64 and len(back) == len(ds.interactions)
    assert pd.read_parquet(items_path)["item_id"].tolist() == ds.items["item_id"].tolist()
