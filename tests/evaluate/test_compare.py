"""Paired model comparison: bootstrap CIs, promotion rule, top-k overlap, formatting."""

from __future__ import annotations

import numpy as np
import pytest

from learn.evaluate import compare as C
from learn.evaluate.compare import (
    BootstrapResult,
    compare_ranks,
    format_comparison,
    paired_bootstrap,
    per_user_metrics,
    should_promote,
    topk_overlap,
)
from learn.evaluate.metrics import metrics_from_ranks


def centred_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    e = rng.normal(0.0, scale, n)
    return e - e.mean()


# ------------------------------------------------------------------------------ per-user metrics


def test_per_user_metrics_hand_values():
    m = per_user_metrics(np.array([0, 1, 9, 10, 50]), k=10)
    assert set(m) == {"ndcg_at_10", "recall_at_10"}
    np.testing.assert_allclose(m["ndcg_at_10"], [1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0, 0.0])
    np.testing.assert_array_equal(m["recall_at_10"], [1, 1, 1, 0, 0])


def test_per_user_metrics_means_match_metrics_from_ranks():
    ranks = np.random.default_rng(0).integers(0, 40, 300)
    per_user = per_user_metrics(ranks, k=5)
    ref = metrics_from_ranks(ranks, ks=(5,))
    assert per_user["ndcg_at_5"].mean() == pytest.approx(ref["ndcg_at_5"])
    assert per_user["recall_at_5"].mean() == pytest.approx(ref["recall_at_5"])


@pytest.mark.parametrize("ranks", [np.array([]), np.array([[1, 2]]), np.array([1.0, -1.0]), np.array([1.0, np.nan])])
def test_per_user_metrics_rejects_bad_ranks(ranks):
    with pytest.raises(ValueError, match="ranks"):
        per_user_metrics(ranks)


def test_per_user_metrics_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        per_user_metrics(np.array([1, 2]), k=0)


# ------------------------------------------------------------------------------------- bootstrap


def test_identical_arrays_give_zero_delta():
    a = np.random.default_rng(1).random(400)
    res = paired_bootstrap(a, a.copy(), n_resamples=500)
    assert isinstance(res, BootstrapResult)
    assert res.delta == 0.0
    assert res.ci_low <= 0.0 <= res.ci_high
    assert res.p_value == 1.0
    assert res.n_users == 400
    assert not should_promote({"delta_ndcg_at_10": res.delta, "delta_ndcg_at_10_ci_low": res.ci_low})


def test_clear_improvement_is_promoted():
    rng = np.random.default_rng(2)
    a = rng.random(1000)
    b = a + 0.05 + centred_noise(rng, 1000, 0.05)
    res = paired_bootstrap(a, b, n_resamples=1000)
    assert res.delta == pytest.approx(0.05)
    assert 0.0 < res.ci_low < res.delta < res.ci_high
    assert res.p_value < 0.01
    assert should_promote({"delta_ndcg_at_10": res.delta, "delta_ndcg_at_10_ci_low": res.ci_low})


def test_small_noisy_difference_straddles_zero():
    rng = np.random.default_rng(3)
    a = rng.random(500)
    b = a + 0.001 + centred_noise(rng, 500, 0.2)  # true gain far below the ~0.009 standard error
    res = paired_bootstrap(a, b, n_resamples=1000)
    assert res.delta == pytest.approx(0.001)
    assert res.ci_low < 0.0 < res.ci_high
    assert res.p_value > 0.5
    assert not should_promote({"delta_ndcg_at_10": res.delta, "delta_ndcg_at_10_ci_low": res.ci_low})


def test_negative_delta_p_value_and_ci():
    rng = np.random.default_rng(4)
    a = rng.random(800)
    res = paired_bootstrap(a, a - 0.05 + centred_noise(rng, 800, 0.05), n_resamples=500)
    assert res.ci_high < 0.0 and res.p_value < 0.01


def test_same_indices_for_a_and_b():
    # b - a is constant per user: with paired resampling every resampled delta equals it exactly
    a = np.random.default_rng(5).random(300)
    res = paired_bootstrap(a, a + 0.25, n_resamples=300)
    assert res.ci_low == pytest.approx(0.25) and res.ci_high == pytest.approx(0.25)


def test_ci_shrinks_with_more_users():
    def width(n: int) -> float:
        rng = np.random.default_rng(6)
        a = rng.random(n)
        res = paired_bootstrap(a, a + rng.normal(0.01, 0.1, n), n_resamples=500)
        return res.ci_high - res.ci_low

    small, large = width(200), width(5000)
    assert large < small / 3  # ~ sqrt(25) = 5 times narrower


def test_seed_reproducibility():
    rng = np.random.default_rng(7)
    a, b = rng.random(250), rng.random(250)
    assert paired_bootstrap(a, b, n_resamples=400, seed=11) == paired_bootstrap(a, b, n_resamples=400, seed=11)
    assert paired_bootstrap(a, b, n_resamples=400, seed=11) != paired_bootstrap(a, b, n_resamples=400, seed=12)


def test_chunked_resampling_matches_statistically(monkeypatch):
    rng = np.random.default_rng(8)
    a = rng.random(1000)
    b = a + 0.02 + centred_noise(rng, 1000, 0.1)
    whole = paired_bootstrap(a, b, n_resamples=1000)
    monkeypatch.setattr(C, "_MAX_CHUNK_ENTRIES", 3 * 1000 + 7)  # 3 resamples per chunk, ragged end
    chunked = paired_bootstrap(a, b, n_resamples=1000)
    assert chunked.delta == whole.delta
    assert chunked.ci_low == pytest.approx(whole.ci_low, abs=2e-3)
    assert chunked.ci_high == pytest.approx(whole.ci_high, abs=2e-3)


def test_alpha_widens_interval():
    rng = np.random.default_rng(9)
    a, b = rng.random(300), rng.random(300)
    r95 = paired_bootstrap(a, b, n_resamples=800, alpha=0.05)
    r50 = paired_bootstrap(a, b, n_resamples=800, alpha=0.5)
    assert r95.ci_low < r50.ci_low < r50.ci_high < r95.ci_high


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.ones(3), np.ones(4), "same length"),
        (np.array([]), np.array([]), "a must be a non-empty"),
        (np.ones(3), np.ones((3, 1)), "b must be a non-empty 1-d"),
        (np.array([1.0, np.nan]), np.ones(2), "a holds NaN"),
        (np.ones(2), np.array([1.0, np.inf]), "b holds NaN"),
    ],
)
def test_bootstrap_validation(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b)


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(np.ones(3), np.ones(3), n_resamples=0)
    with pytest.raises(ValueError, match="alpha"):
        paired_bootstrap(np.ones(3), np.ones(3), alpha=1.0)


# ---------------------------------------------------------------------------------- top-k overlap


def test_topk_overlap_known_arrays():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[3, 2, 9], [7, 8, 9]])
    assert topk_overlap(a, b) == pytest.approx((2 / 3 + 0) / 2)
    assert topk_overlap(a, a[:, ::-1]) == 1.0  # order within the top-k does not matter
    # the same ids in another user's row do not count
    assert topk_overlap(np.array([[1, 2], [3, 4]]), np.array([[3, 4], [1, 2]])) == 0.0
    assert topk_overlap(np.array([[-1, 0]]), np.array([[0, 5]])) == 0.5


def test_topk_overlap_matches_sets():
    rng = np.random.default_rng(10)
    a = np.stack([rng.choice(50, 8, replace=False) for _ in range(200)])
    b = np.stack([rng.choice(50, 8, replace=False) for _ in range(200)])
    ref = np.mean([len(set(x) & set(y)) / 8 for x, y in zip(a.tolist(), b.tolist())])
    assert topk_overlap(a, b) == pytest.approx(ref)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.ones((2, 3), dtype=int), np.ones((2, 4), dtype=int), "same shape"),
        (np.ones(3, dtype=int), np.ones(3, dtype=int), "a_ids must be"),
        (np.ones((2, 3), dtype=int), np.ones((2, 3)), "b_ids must hold integer"),
        (np.zeros((0, 3), dtype=int), np.zeros((0, 3), dtype=int), "a_ids must be"),
    ],
)
def test_topk_overlap_validation(a, b, match):
    with pytest.raises(ValueError, match=match):
        topk_overlap(a, b)


# ---------------------------------------------------------------------------------- compare_ranks


def ndcg(r: np.ndarray, k: int) -> float:
    return float(np.mean([1.0 / np.log2(x + 2) if x < k else 0.0 for x in r]))


def test_compare_ranks_values_and_keys():
    rng = np.random.default_rng(12)
    ra = rng.integers(0, 60, 700)
    rb = np.maximum(ra - rng.integers(0, 5, 700), 0)
    out = compare_ranks(ra, rb, n_resamples=300)
    assert set(out) == {
        "delta_ndcg_at_10", "delta_ndcg_at_10_ci_low", "delta_ndcg_at_10_ci_high",
        "delta_recall_at_10", "delta_recall_at_10_ci_low", "delta_recall_at_10_ci_high",
        "a_ndcg_at_10", "b_ndcg_at_10", "a_recall_at_10", "b_recall_at_10",
        "delta_ndcg_at_10_p_value", "n_users",
    }  # fmt: skip
    assert out["a_ndcg_at_10"] == pytest.approx(ndcg(ra, 10))
    assert out["b_ndcg_at_10"] == pytest.approx(ndcg(rb, 10))
    assert out["a_recall_at_10"] == pytest.approx(np.mean(ra < 10))
    assert out["b_recall_at_10"] == pytest.approx(np.mean(rb < 10))
    assert out["delta_ndcg_at_10"] == pytest.approx(ndcg(rb, 10) - ndcg(ra, 10))
    assert out["delta_recall_at_10"] == pytest.approx(np.mean(rb < 10) - np.mean(ra < 10))
    assert out["delta_ndcg_at_10_ci_low"] <= out["delta_ndcg_at_10"] <= out["delta_ndcg_at_10_ci_high"]
    assert out["n_users"] == 700
    assert should_promote(out)  # B never ranks the target lower
    assert should_promote(out, "recall_at_10")


def test_compare_ranks_uses_k_in_keys():
    out = compare_ranks(np.array([0, 3, 7]), np.array([1, 2, 9]), k=5, n_resamples=50)
    assert "delta_ndcg_at_5_ci_low" in out and "b_recall_at_5" in out and "delta_ndcg_at_5_p_value" in out
    assert out["a_recall_at_5"] == pytest.approx(2 / 3)


def test_compare_ranks_identical_not_promoted():
    r = np.random.default_rng(13).integers(0, 30, 200)
    out = compare_ranks(r, r.copy(), n_resamples=200)
    assert out["delta_ndcg_at_10"] == 0.0 and out["delta_ndcg_at_10_p_value"] == 1.0
    assert not should_promote(out)


def test_compare_ranks_validation():
    with pytest.raises(ValueError, match="same shape"):
        compare_ranks(np.array([1, 2]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="ranks"):
        compare_ranks(np.array([1, -2]), np.array([1, 2]))


def test_should_promote_rule_and_missing_key():
    assert should_promote({"delta_ndcg_at_10": 0.01, "delta_ndcg_at_10_ci_low": 0.001})
    assert not should_promote({"delta_ndcg_at_10": 0.01, "delta_ndcg_at_10_ci_low": -0.001})
    assert not should_promote({"delta_ndcg_at_10": 0.0, "delta_ndcg_at_10_ci_low": 0.0})
    assert not should_promote({"delta_ndcg_at_10": float("nan"), "delta_ndcg_at_10_ci_low": float("nan")})
    with pytest.raises(KeyError, match="delta_ndcg_at_10_ci_low"):
        should_promote({"delta_ndcg_at_10": 0.01})


def test_format_comparison():
    rng = np.random.default_rng(14)
    ra = rng.integers(0, 40, 300)
    out = compare_ranks(ra, ra, n_resamples=100)
    text = format_comparison(out, overlap=0.625)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "A", "B", "delta", "95%", "CI", "p"]
    assert lines[1].startswith("ndcg_at_10") and lines[2].startswith("recall_at_10")
    assert len({line.index("[") for line in lines[1:3]}) == 1  # CI column aligned
    assert "promote B on ndcg_at_10: no" in text
    assert "users: 300" in text and "top-k overlap: 0.6250" in text
    assert "overlap" not in format_comparison(out, None)


def test_top_k_rows_lowers_each_user_own_items_by_the_served_penalty():
    from learn.evaluate.ab import top_k_rows

    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(9, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    plain = top_k_rows(users, items, 5, chunk=4)
    histories = [np.array(row[:2]) for row in plain]  # two of each user's top 5 are its own items
    got = top_k_rows(users, items, 5, chunk=4, histories=histories, history_penalty=10.0)
    for row, h, before in zip(got, histories, plain):
        assert not set(row) & set(h) and set(before[2:]) <= set(row)
