"""The training losses. Score = scale * cosine (vectors arrive L2-normalised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_loss(user: torch.Tensor, all_items: torch.Tensor, targets: torch.Tensor, scale: float,
                      column_bias: torch.Tensor | None = None, masked: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the whole catalog. user [B, d], all_items [N, d], targets [B] catalog indices;
    ``column_bias`` [N] is added to every row's logits (logit adjustment: training only); ``masked``
    [B, N] bool: columns left out of a row's softmax (never its target's)."""
    logits = scale * user @ all_items.T
    if column_bias is not None:
        logits = logits + column_bias.unsqueeze(0)
    if masked is not None:
        logits = logits.masked_fill(masked, float("-inf"))
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
    pair_valid: torch.Tensor | None = None,
    tgt_log_q: torch.Tensor | None = None,
    neg_vecs: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense all-action loss: every valid (history position, target) pair of the same user is a
    positive; its negatives are the other users' targets in the batch (and the shared pool
    ``negatives``, when given), except items that are one of this user's own valid targets (false
    negatives). The user's other targets are never in a positive's denominator.

    hist [B, H, d] user vectors at sampled history positions, hist_valid [B, H] bool;
    tgt [B, T, d] target vectors, tgt_valid [B, T] bool, tgt_items [B, T] catalog indices.
    pair_valid [B, H, T] bool: which (position, target) pairs are positives (None: all valid ones;
    a target window makes it sparser). tgt_log_q [B, T] / neg_log_q [M]: log of each column's
    expected count among the batch's targets / in the pool, subtracted from its logits (logQ
    correction; None: uncorrected). neg_vecs [M, d] with catalog indices negatives [M]: the pool; an
    in-batch column whose item is also in the pool is masked, so each item is a negative once.

    Only valid rows and columns are scored: O(P x (Q + M) x d) for P valid positions and Q valid
    targets. With the whole catalog as the pool and no correction, a pair's loss is the softmax over
    the catalog minus the user's other targets (a test holds it).
    """
    B = hist.shape[0]
    dev = hist.device
    pairs = hist_valid.unsqueeze(2) & tgt_valid.unsqueeze(1)
    if pair_valid is not None:
        pairs = pairs & pair_valid
    rows_b, rows_h = hist_valid.nonzero(as_tuple=True)  # [P]
    cols_b, cols_t = tgt_valid.nonzero(as_tuple=True)  # [Q]
    q, k = hist[rows_b, rows_h], tgt[cols_b, cols_t]
    items = tgt_items[cols_b, cols_t]
    logits = scale * q @ k.T  # [P, Q]
    if tgt_log_q is not None:
        logits = logits - tgt_log_q[cols_b, cols_t].unsqueeze(0)
    same_user = rows_b.unsqueeze(1) == cols_b.unsqueeze(0)  # [P, Q]
    positive = same_user & pairs[rows_b, rows_h][:, cols_t]
    # columns whose item is one of the row's user's own targets: not negatives
    uniq, code = torch.unique(items, return_inverse=True)  # [U] distinct target items, code [Q]
    own_item = torch.zeros(B, len(uniq), dtype=torch.bool, device=dev)
    own_item[cols_b, code] = True  # [B, U]: user b has item u among its targets
    negative = ~same_user & ~own_item[rows_b][:, code]
    neg_logits = [logits.masked_fill(~negative, float("-inf"))]
    if neg_vecs is not None and negatives is not None and negatives.numel():
        pool = scale * q @ neg_vecs.T  # [P, M]
        if neg_log_q is not None:
            pool = pool - neg_log_q.unsqueeze(0)
        own_pool = (tgt_items.unsqueeze(2) == negatives.view(1, 1, -1)) & tgt_valid.unsqueeze(2)  # [B, T, M]
        neg_logits.append(pool.masked_fill(own_pool.any(1)[rows_b], float("-inf")))
        in_pool = (items.unsqueeze(1) == negatives.unsqueeze(0)).any(1)  # [Q]
        neg_logits[0] = neg_logits[0].masked_fill(in_pool.unsqueeze(0), float("-inf"))
    lse_neg = torch.logsumexp(torch.cat(neg_logits, 1), dim=1)  # [P]; -inf when a row has no negative
    p_idx, q_idx = positive.nonzero(as_tuple=True)
    if p_idx.numel() == 0:
        raise ValueError("dense_all_action_loss: the batch holds no valid (history, target) pair")
    pos = logits[p_idx, q_idx]
    return (torch.logaddexp(pos, lse_neg[p_idx]) - pos).mean()  # no negatives at all (a batch of one) -> 0
