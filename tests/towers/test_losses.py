import math

import torch
import torch.nn.functional as F

from learn.towers.losses import dense_all_action_loss, full_softmax_loss, in_batch_softmax_loss


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_full_softmax_is_cross_entropy_over_catalog():
    torch.manual_seed(0)
    u, items = unit(4, 8), unit(50, 8)
    t = torch.tensor([3, 10, 3, 49])
    expected = sum(-(20 * u[i] @ items[t[i]] - torch.logsumexp(20 * u[i] @ items.T, 0)) for i in range(4)) / 4
    assert torch.allclose(full_softmax_loss(u, items, t, 20.0), expected)


def test_in_batch_masks_rows_with_the_same_target():
    torch.manual_seed(1)
    u, v = unit(4, 8), unit(4, 8)
    t = torch.tensor([5, 7, 5, 9])  # rows 0 and 2 share an item: not each other's negatives
    total = 0.0
    for i in range(4):
        negs = [j for j in range(4) if j == i or t[j] != t[i]]
        logits = torch.stack([20 * u[i] @ v[j] for j in negs])
        total += -(20 * u[i] @ v[i] - torch.logsumexp(logits, 0))
    assert torch.allclose(in_batch_softmax_loss(u, v, t, 20.0), total / 4)


def test_in_batch_masks_other_positions_of_the_same_user():
    """all_positions puts several positions of one sequence in a batch: a user's other positions are
    not its negatives, nor are rows with the same target item; the row's own target always counts."""
    torch.manual_seed(3)
    u, v = unit(6, 8), unit(6, 8)
    t = torch.tensor([5, 7, 8, 9, 5, 2])
    owners = torch.tensor([0, 0, 1, 2, 2, 2])  # rows 0-1 one user, 3-5 another; rows 0 and 4 share item 5
    total = 0.0
    for i in range(6):
        negs = [j for j in range(6) if j == i or (t[j] != t[i] and owners[j] != owners[i])]
        logits = torch.stack([20 * u[i] @ v[j] for j in negs])
        total += -(20 * u[i] @ v[i] - torch.logsumexp(logits, 0))
    got = in_batch_softmax_loss(u, v, t, 20.0, owners=owners)
    assert torch.allclose(got, total / 6)
    assert not torch.allclose(got, in_batch_softmax_loss(u, v, t, 20.0))  # the mask changes the loss
    # one user holding the whole batch: every row's only candidate is its own target, loss 0
    assert float(in_batch_softmax_loss(u, v, t, 20.0, owners=torch.zeros(6, dtype=torch.long))) == 0.0


def test_dense_all_action_matches_explicit_loop():
    torch.manual_seed(2)
    B, H, T, d, s = 3, 2, 3, 8, 5.0
    hist, tgt = unit(B, H, d), unit(B, T, d)
    hv = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    tv = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    items = torch.tensor([[1, 2, 3], [4, 1, -1], [7, -1, -1]])  # user 1 shares item 1 with user 0
    losses = []
    for b in range(B):
        own = {int(items[b, t]) for t in range(T) if tv[b, t]}
        for h in range(H):
            if not hv[b, h]:
                continue
            for t in range(T):
                if not tv[b, t]:
                    continue
                pos = s * hist[b, h] @ tgt[b, t]
                negs = [s * hist[b, h] @ tgt[c, k] for c in range(B) for k in range(T)
                        if c != b and tv[c, k] and int(items[c, k]) not in own]
                losses.append(-(pos - torch.logsumexp(torch.stack([pos] + negs), 0)))
    expected = torch.stack(losses).mean()
    got = dense_all_action_loss(hist, hv, tgt, tv, items, s)
    assert torch.allclose(got, expected)


def test_losses_are_log_catalog_size_when_all_vectors_equal():
    # the collapse symptom: identical vectors give exactly log(N)
    u = F.normalize(torch.ones(4, 8), dim=-1)
    items = F.normalize(torch.ones(100, 8), dim=-1)
    assert math.isclose(float(full_softmax_loss(u, items, torch.tensor([0, 1, 2, 3]), 20.0)), math.log(100), rel_tol=1e-5)
