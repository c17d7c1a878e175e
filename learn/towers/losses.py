"""The training losses. Score = scale * cosine (vectors arrive L2-normalised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_loss(user: torch.Tensor, all_items: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over the whole catalog. user [B, d], all_items [N, d], targets [B] catalog indices."""
    logits = scale * user @ all_items.T
    return F.cross_entropy(logits, targets)


def sampled_softmax_loss(
    user: torch.Tensor, target_vecs: torch.Tensor, targets: torch.Tensor, neg_vecs: torch.Tensor,
    negatives: torch.Tensor, scale: float, owners: torch.Tensor | None = None,
    target_log_q: torch.Tensor | None = None, neg_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the batch's targets plus a shared pool of sampled negatives: O(P x (P + M) x d),
    whatever the catalog size. user [P, d], target_vecs [P, d] with catalog indices targets [P];
    neg_vecs [M, d] with catalog indices negatives [M].

    Row i's positive is its own target (column i). Masked: other rows' targets that are the same
    item or belong to the same user (``owners``), as in-batch does; in-batch targets that are also
    in the pool (each item is a negative once); pool entries equal to the row's own target. With
    ``target_log_q`` [P] / ``neg_log_q`` [M] (log of each column's expected count in the candidate
    set) every logit is corrected by it (logQ correction). With the whole catalog as the pool and
    no correction this is exactly ``full_softmax_loss``."""
    inb = scale * user @ target_vecs.T
    pool = scale * user @ neg_vecs.T
    if target_log_q is not None:
        inb = inb - target_log_q.unsqueeze(0)
    if neg_log_q is not None:
        pool = pool - neg_log_q.unsqueeze(0)
    hit = targets.unsqueeze(1) == negatives.unsqueeze(0)  # [P, M]: row's target among the pool
    masked = targets.unsqueeze(1) == targets.unsqueeze(0)
    if owners is not None:
        masked |= owners.unsqueeze(1) == owners.unsqueeze(0)
    masked |= hit.any(1).unsqueeze(0)  # column j's item is already a pool negative
    masked.fill_diagonal_(False)
    logits = torch.cat([inb.masked_fill(masked, float("-inf")), pool.masked_fill(hit, float("-inf"))], 1)
    return F.cross_entropy(logits, torch.arange(len(targets), device=logits.device))


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
