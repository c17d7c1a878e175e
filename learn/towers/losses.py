"""The three training losses. Score = scale * cosine (vectors arrive L2-normalised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_loss(user: torch.Tensor, all_items: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over the whole catalog. user [B, d], all_items [N, d], targets [B] catalog indices."""
    logits = scale * user @ all_items.T
    return F.cross_entropy(logits, targets)


def in_batch_softmax_loss(
    user: torch.Tensor, target_vecs: torch.Tensor, targets: torch.Tensor, scale: float,
    owners: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the batch's targets; other rows whose target is the same item are masked out
    (they are not negatives), and so are other rows of the same user (``owners``, when several
    positions of one sequence are in the batch). user [B, d], target_vecs [B, d], targets [B]."""
    logits = scale * user @ target_vecs.T
    same = targets.unsqueeze(1) == targets.unsqueeze(0)
    if owners is not None:
        same |= owners.unsqueeze(1) == owners.unsqueeze(0)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=logits.device))


def dense_all_action_loss(
    hist: torch.Tensor,
    hist_valid: torch.Tensor,
    tgt: torch.Tensor,
    tgt_valid: torch.Tensor,
    tgt_items: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense all-action loss: every (history position, target) pair of the same user is a positive;
    the targets of the other users in the batch are the negatives, except targets that are the same
    item as one of this user's own targets (false negatives).

    hist [B, H, d] user vectors at sampled history positions, hist_valid [B, H] bool;
    tgt [B, T, d] sampled target vectors, tgt_valid [B, T] bool, tgt_items [B, T] catalog indices.
    """
    B, H, d = hist.shape
    T = tgt.shape[1]
    q = hist.reshape(B * H, d)
    k = tgt.reshape(B * T, d)
    logits = scale * q @ k.T  # [B*H, B*T]
    owner_q = torch.arange(B, device=q.device).repeat_interleave(H)
    owner_k = torch.arange(B, device=q.device).repeat_interleave(T)
    items_k = tgt_items.reshape(-1)
    valid_k = tgt_valid.reshape(-1)
    # per user: does target column t hold an item that is one of this user's own valid targets?
    own = (tgt_items.unsqueeze(2) == items_k.view(1, 1, -1)) & tgt_valid.unsqueeze(2)  # [B, T, B*T]
    collides = own.any(1)  # [B, B*T]
    negative = (owner_k.view(1, -1) != torch.arange(B, device=q.device).view(-1, 1)) & ~collides & valid_k.view(1, -1)
    neg_mask = negative[owner_q]  # [B*H, B*T]
    lse_neg = torch.logsumexp(logits.masked_fill(~neg_mask, float("-inf")), dim=1)  # [B*H]
    pos = logits.view(B, H, B, T)[torch.arange(B), :, torch.arange(B), :]  # [B, H, T]
    lse = torch.logaddexp(pos, lse_neg.view(B, H, 1))  # -inf negatives (batch of one) -> loss 0
    pair_valid = hist_valid.unsqueeze(2) & tgt_valid.unsqueeze(1)
    nll = (lse - pos)[pair_valid]
    if nll.numel() == 0:
        raise ValueError("dense_all_action_loss: the batch holds no valid (history, target) pair")
    return nll.mean()
