"""train.recipe=sampled_softmax: batch targets + a shared pool of sampled negatives, logQ-corrected."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learn.config import TrainConfig
from learn.towers.losses import full_softmax_loss, sampled_softmax_loss
from learn.train.batches import NegativeSampler, SampledBatch
from learn.train.recipes import compute_loss, epoch_batches
from tests.train.test_loop import model_for, synthetic


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_the_whole_catalog_as_pool_without_correction_is_the_full_softmax():
    torch.manual_seed(0)
    u, items = unit(6, 8), unit(40, 8)
    t = torch.tensor([3, 10, 3, 39, 0, 10])  # repeated targets: same-item columns are masked
    got = sampled_softmax_loss(u, items[t], t, items, torch.arange(40), 20.0)
    torch.testing.assert_close(got, full_softmax_loss(u, items, t, 20.0))


def test_against_an_explicit_loop_with_masks_and_correction():
    torch.manual_seed(1)
    u, items = unit(5, 8), unit(30, 8)
    t = torch.tensor([4, 7, 4, 12, 20])
    owners = torch.tensor([0, 0, 1, 2, 3])  # rows 0 and 1: two positions of one user
    pool = torch.tensor([7, 25, 25, 3, 12, 29])  # duplicates allowed; 7 and 12 are also batch targets
    tq, nq = torch.randn(5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = sampled_softmax_loss(u, items[t], t, items[pool], pool, 20.0, owners, tq, nq)
    total = 0.0
    for i in range(5):
        pos = 20 * u[i] @ items[t[i]] - tq[i]
        terms = [pos]
        for j in range(5):
            if j != i and t[j] != t[i] and owners[j] != owners[i] and t[j] not in pool:
                terms.append(20 * u[i] @ items[t[j]] - tq[j])
        for m in range(6):
            if pool[m] != t[i]:
                terms.append(20 * u[i] @ items[pool[m]] - nq[m])
        total += -(pos - torch.logsumexp(torch.stack(terms), 0))
    torch.testing.assert_close(got, total / 5)


@pytest.mark.parametrize("kind", ["uniform", "popularity", "mixed"])
def test_the_sampler_draws_by_its_distribution(kind):
    popularity = np.array([0, 1, 2, 7, 0, 10], dtype=float)
    sampler = NegativeSampler(popularity, kind)
    draws = sampler.draw(200_000, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, sampler.p, atol=4e-3)
    assert math.isclose(sampler.p.sum(), 1.0)
    if kind == "popularity":
        assert freq[0] == freq[4] == 0  # never-bought items are never drawn


def test_sampled_batches_carry_the_pool_and_the_log_q_terms():
    splits, content = synthetic()
    cfg = TrainConfig(recipe="sampled_softmax", batch_size=16, num_negatives=32, negative_sampler="mixed")
    batch = next(iter(epoch_batches(splits.train, cfg, 10, seed=0, epoch=1, num_items=len(content))))
    assert isinstance(batch, SampledBatch) and batch.negatives.shape == (32,)
    popularity = np.bincount(np.concatenate(splits.train), minlength=len(content))
    sampler = NegativeSampler(popularity, "mixed")
    np.testing.assert_allclose(batch.neg_log_q.numpy(), np.log(32 * sampler.p[batch.negatives.numpy()]), rtol=1e-6)
    np.testing.assert_allclose(batch.target_log_q.numpy(),
                               np.log(len(batch.targets) * sampler.target_p[batch.targets.numpy()]), rtol=1e-6)
    # the step's cost does not depend on the catalog: only targets and the pool go through the item tower
    model = model_for(content)
    calls = []
    original = model.item_embedding
    model.item_embedding = lambda items: calls.append(len(items)) or original(items)
    loss = compute_loss(model, batch, cfg)
    assert torch.isfinite(loss) and sorted(calls) == sorted([len(batch.targets), 32])
