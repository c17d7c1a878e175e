"""The trained recipes, each defined here once: how an epoch's batches are drawn and which loss
they train. ``train.recipe`` names a row of ``RECIPES``; the no-training floors are baselines
(``learn.evaluate.baselines.BASELINES``), not recipes.

full_softmax      one target per user and epoch, index uniform in [1, L-1] (or every position with
                  ``train.all_positions``); softmax over every catalog item (all items through the
                  item tower each step: the reference objective, O(catalog) per step), or over the
                  items that occur in training only (``train.softmax_items=seen``); with
                  ``train.logit_adjustment`` each column's logit gains a popularity bias (training only);
                  with ``train.history_negatives=false`` a row's own earlier items are not its negatives
in_batch          target index uniform in [L//2, L-1] (or every position); softmax over the batch's
                  targets, rows with the same item or of the same user masked
dense_all_action  each sequence cut into a history and a target part; N_h history positions x N_t
                  recency-weighted targets per user (or every position a cut, ``train.all_positions``;
                  positives within ``train.target_window`` items); negatives: the other users' targets
                  plus a shared pool of ``train.num_negatives``, logQ-corrected (``train.logq_correction``)

A loss takes (model, batch, train config, rows): ``rows`` runs a tower over the rows of a batch
(whole in one process, sharded and gathered under DDP: ``RowMap``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from learn.config import TrainConfig, TrainedRecipe
from learn.towers.losses import dense_all_action_loss, full_softmax_loss, in_batch_softmax_loss, sampled_softmax_loss
from learn.towers.model import id_member_indices, member_slices
from learn.train.batches import (CandidateBatch, DenseBatch, NegativeSampler, PairBatch, SampledBatch, dense_batches,
                                 item_popularity, pair_batches)

Batches = Callable[..., Iterator]
Loss = Callable[..., torch.Tensor]

RowMap = Callable[..., torch.Tensor]
"""``rows(fn, *tensors)``: ``fn`` over the rows of ``tensors`` (all cut alike on dim 0), the outputs
concatenated on dim 0 in row order. ``whole_rows`` calls ``fn`` once; the DDP version computes only
this worker's rows and gathers the rest, so every worker ends with the whole result."""


def whole_rows(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    return fn(*tensors)


@dataclass(frozen=True)
class Recipe:
    batches: Batches  # (train, cfg, max_history, rng, order_rng, rank, world_size, num_items) -> batches
    loss: Loss  # (model, batch, cfg, rows) -> scalar loss over the whole batch


def _core(model):
    return model.module if hasattr(model, "module") else model


def _per_member(model, loss_fn: Loss, *vectors: torch.Tensor) -> torch.Tensor:
    """Each member trained on its own slice of the tower outputs, as if alone (an ensemble, not
    one wide model): the mean of the members' losses. ``loss_fn`` takes the member's index and its slice
    of each of ``vectors``.
    Members whose training has ended (``TwinTowers.frozen_members``) add no term; the sum is still
    divided by every member, so the others' gradients keep their scale."""
    core = _core(model)
    k = core.cfg.members
    terms = [loss_fn(m, *parts) for m, parts in enumerate(zip(*(member_slices(v, k) for v in vectors)))
             if m not in core.frozen_members]
    return torch.stack(terms).mean() if len(terms) == k else torch.stack(terms).sum() / k


def logit_adjusted_members(cfg: TrainConfig, model_cfg) -> frozenset[int]:
    """The members whose full-softmax training logits carry ``train.logit_adjustment``'s bias: none without
    it, every member, or (``train.logit_adjustment_members=content``) the members without item ID vectors."""
    if cfg.recipe != "full_softmax" or not cfg.logit_adjustment:
        return frozenset()
    every = range(model_cfg.members)
    if cfg.logit_adjustment_members == "all":
        return frozenset(every)
    with_ids = set(id_member_indices(model_cfg))
    return frozenset(m for m in every if m not in with_ids)


def _user_vectors(model, batch: PairBatch, rows) -> torch.Tensor:
    """The user vectors at every predicting position of a pair batch."""
    def at_positions(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = model(tokens)  # ids: the (consecutive) batch rows these tokens are
        keep = (batch.rows >= ids[0]) & (batch.rows <= ids[-1])
        return out[batch.rows[keep] - ids[0], batch.positions[keep]]

    return rows(at_positions, batch.tokens, torch.arange(batch.tokens.shape[0], device=batch.tokens.device))


def _pair_batches(first_target: Callable[[int], int]) -> Batches:
    def batches(train, cfg: TrainConfig, max_history, rng, order_rng, rank, world_size, num_items):
        return pair_batches(train, batch_size=cfg.batch_size, max_history=max_history, first_target=first_target,
                            all_positions=cfg.all_positions, rng=rng, order_rng=order_rng, rank=rank,
                            world_size=world_size, coverage=cfg.epoch_coverage)
    return batches


def _full_softmax_batches(train, cfg: TrainConfig, max_history, rng, order_rng, rank, world_size, num_items):
    """Pair batches (target index uniform in [1, L-1]); with ``train.softmax_items=seen`` each carries
    the items that occur in ``train`` as the softmax's columns (every target is one of them), and with
    ``train.logit_adjustment`` each column's logit bias (the weight x log(1 + training interactions))."""
    batches = _pair_batches(lambda length: 1)(train, cfg, max_history, rng, order_rng, rank, world_size, num_items)
    if cfg.softmax_items == "catalog" and not cfg.logit_adjustment:
        yield from batches
        return
    counts = item_popularity(train, num_items)
    columns = np.flatnonzero(counts > 0) if cfg.softmax_items == "seen" else np.arange(num_items)
    column = np.full(num_items, -1, dtype=np.int64)
    column[columns] = np.arange(len(columns))
    column = torch.from_numpy(column)
    candidates = torch.from_numpy(columns.astype(np.int64))
    bias = torch.from_numpy((cfg.logit_adjustment * np.log1p(counts[columns])).astype(np.float32))
    for batch in batches:
        yield CandidateBatch(**vars(batch), candidates=candidates, target_cols=column[batch.targets],
                             column_bias=bias)


def _sampled_batches(train, cfg: TrainConfig, max_history, rng, order_rng, rank, world_size, num_items):
    """Full-softmax pair batches (target index uniform in [1, L-1]), each with its negative pool
    (drawn from the items seen in training only with ``train.softmax_items=seen``)."""
    sampler = NegativeSampler(item_popularity(train, num_items), cfg.negative_sampler,
                              seen_only=cfg.softmax_items == "seen")
    for batch in _pair_batches(lambda length: 1)(train, cfg, max_history, rng, order_rng, rank, world_size,
                                                 num_items):
        yield sampler.attach(batch, cfg.num_negatives, rng)


def _dense_batches(train, cfg: TrainConfig, max_history, rng, order_rng, rank, world_size, num_items):
    """Dense batches with the logQ terms of their targets and (``train.num_negatives`` > 0) a shared
    pool of negatives drawn from ``train.negative_sampler``."""
    sampler = NegativeSampler(item_popularity(train, num_items), cfg.negative_sampler)
    return dense_batches(train, batch_size=cfg.batch_size, max_history=max_history, target_len=cfg.target_len,
                         n_history=cfg.n_history, n_targets=cfg.n_targets, recency=cfg.recency_weighting,
                         rng=rng, order_rng=order_rng, rank=rank, world_size=world_size,
                         target_window=cfg.target_window, all_positions=cfg.all_positions, sampler=sampler,
                         num_negatives=cfg.num_negatives, coverage=cfg.epoch_coverage)


def own_history_columns(batch: PairBatch, columns: torch.Tensor | None, num_columns: int,
                        targets: torch.Tensor) -> torch.Tensor:
    """[P, C] bool: for each predicting position, the softmax columns holding an item the row has at or
    before that position (what its user tower read), its own target column excepted. ``columns``: the
    softmax's catalog indices, sorted (None: the whole catalog, column = catalog index); ``targets`` [P]
    the target columns. O(P x L) to build, the size of the logits to hold."""
    tokens = batch.tokens[batch.rows]  # [P, L], catalog index + 1, 0 = pad
    upto = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) <= batch.positions.unsqueeze(1)
    pair, slot = (upto & (tokens > 0)).nonzero(as_tuple=True)
    items = tokens[pair, slot] - 1
    if columns is not None:  # items outside the softmax's columns have no column to mask
        at = torch.searchsorted(columns, items).clamp_max(len(columns) - 1)
        keep = columns[at] == items
        pair, items = pair[keep], at[keep]
    out = torch.zeros(len(targets), num_columns, dtype=torch.bool, device=tokens.device)
    out[pair, items] = True
    out[torch.arange(len(targets), device=tokens.device), targets] = False
    return out


def full_softmax(model, batch: PairBatch, cfg: TrainConfig, rows) -> torch.Tensor:
    user = _user_vectors(model, batch, rows)
    core = _core(model)
    bias, subset = None, isinstance(batch, CandidateBatch)
    if subset:  # the softmax over the batch's columns, each with its logit bias
        columns, targets = batch.candidates, batch.target_cols
        bias = batch.column_bias if cfg.logit_adjustment else None
    else:
        columns, targets = torch.arange(core.num_items, device=user.device), batch.targets
    masked = None if cfg.history_negatives else own_history_columns(batch, columns if subset else None,
                                                                    len(columns), targets)
    items = rows(core.item_embedding, columns)
    adjusted = logit_adjusted_members(cfg, core.cfg) if bias is not None else frozenset()
    return _per_member(model, lambda m, u, i: full_softmax_loss(u, i, targets, cfg.score_scale,
                                                                bias if m in adjusted else None, masked), user, items)


def sampled_softmax(model, batch: SampledBatch, cfg: TrainConfig, rows) -> torch.Tensor:
    user = _user_vectors(model, batch, rows)
    core = _core(model)
    targets = rows(core.item_embedding, batch.targets)
    negatives = rows(core.item_embedding, batch.negatives)
    correct = cfg.logq_correction
    return _per_member(model, lambda m, u, t, n: sampled_softmax_loss(
        u, t, batch.targets, n, batch.negatives, cfg.score_scale, batch.rows,
        batch.target_log_q if correct else None, batch.neg_log_q if correct else None), user, targets, negatives)


def in_batch(model, batch: PairBatch, cfg: TrainConfig, rows) -> torch.Tensor:
    user = _user_vectors(model, batch, rows)
    targets = rows(_core(model).item_embedding, batch.targets)
    return _per_member(model, lambda m, u, t: in_batch_softmax_loss(u, t, batch.targets, cfg.score_scale, batch.rows),
                       user, targets)


def dense_all_action(model, batch: DenseBatch, cfg: TrainConfig, rows) -> torch.Tensor:
    core = _core(model)

    def at(out: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return out[torch.arange(out.shape[0], device=out.device).unsqueeze(1), pos]

    hist = rows(lambda tokens, pos: at(model(tokens), pos), batch.hist_tokens, batch.hist_pos)
    if cfg.all_positions:  # every position a cut: the targets are items of the history itself, each alone
        flat = rows(core.item_embedding, batch.tgt_items[batch.tgt_valid])
        tgt = flat.new_zeros(*batch.tgt_items.shape, flat.shape[-1]).index_put((batch.tgt_valid,), flat)
    else:
        tgt = rows(lambda tokens, pos: at(core.target_sequence_embedding(tokens), pos), batch.tgt_tokens,
                   batch.tgt_pos)
    pool = batch.negatives.numel() > 0
    vectors = (hist, tgt) + ((rows(core.item_embedding, batch.negatives),) if pool else ())
    correct = cfg.logq_correction

    def one(m, h, t, *neg):
        return dense_all_action_loss(h, batch.hist_valid, t, batch.tgt_valid, batch.tgt_items, cfg.score_scale,
                                     batch.pair_valid, batch.tgt_log_q if correct else None,
                                     neg[0] if pool else None, batch.negatives if pool else None,
                                     batch.neg_log_q if (pool and correct) else None)

    return _per_member(model, one, *vectors)


RECIPES: dict[str, Recipe] = {
    "full_softmax": Recipe(_full_softmax_batches, full_softmax),
    "sampled_softmax": Recipe(_sampled_batches, sampled_softmax),
    "in_batch": Recipe(_pair_batches(lambda length: max(1, length // 2)), in_batch),
    "dense_all_action": Recipe(_dense_batches, dense_all_action),
}
assert set(RECIPES) == set(typing.get_args(TrainedRecipe)), "learn.config.TrainedRecipe and RECIPES disagree"


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"train.recipe={name!r} is not a trained recipe; known: {sorted(RECIPES)}")
    return RECIPES[name]


def epoch_batches(train: list[np.ndarray], cfg: TrainConfig, max_history: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1, num_items: int | None = None):
    """The epoch's batches for this worker: the user order depends on (seed, epoch) only, so every
    DDP worker shuffles alike and the shards stay disjoint; sampling within a shard is per worker."""
    order_rng = np.random.default_rng([seed, epoch])
    rng = np.random.default_rng([seed, epoch, rank, 1])
    if num_items is None:
        num_items = 1 + max((int(s.max()) for s in train if len(s)), default=0)
    return recipe(cfg.recipe).batches(train, cfg, max_history, rng, order_rng, rank, world_size, num_items)


def compute_loss(model, batch, cfg: TrainConfig, rows: RowMap = whole_rows) -> torch.Tensor:
    """The recipe's loss over the whole batch; the tower outputs it needs are computed through ``rows``."""
    return recipe(cfg.recipe).loss(model, batch, cfg, rows)
