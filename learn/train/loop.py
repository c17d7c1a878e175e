"""The pieces every training loop shares: optimizer and schedule, one step, one epoch, evaluation.

``train_step`` is one optimisation step on one batch (the recipe's loss, ``learn.train.recipes``);
``run_epoch`` draws the epoch's batches and steps through them; ``evaluate_model`` ranks a split.
``learn.train.fit.fit`` (one process) and ``learn.train.distributed`` (Ray Train DDP: every worker
draws the whole batch and computes the towers for its share of the rows, see ``RowMap``) loop over
them with one ``FitState``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from learn.config import EvalConfig, TrainConfig
from learn.data.ragged import Ragged
from learn.data.sequences import EvalSplit
from learn.device import autocast
from learn.evaluate.metrics import evaluate_both_modes
from learn.towers.mix import ScoreMix, last_items
from learn.towers.model import TwinTowers, pad_tails
from learn.train.batches import epoch_rows, item_popularity
from learn.train.optim import LazyAdamW, clip_gradients
from learn.train.recipes import RowMap, compute_loss, epoch_batches, logit_adjusted_members, whole_rows

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; item ID tables with sparse gradients update only the rows a step touches (learn/train/optim.py)."""
    return LazyAdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up for ``warmup_epochs``, then cosine decay to zero at the last epoch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def steps_per_epoch(train: list[np.ndarray], batch_size: int, world_size: int = 1, rows: int | None = None) -> int:
    """Optimiser steps per epoch on each of ``world_size`` workers; ``rows``: the epoch's batch rows
    (``epoch_rows``; default one per user with at least two items)."""
    rows = epoch_rows(train, 1) if rows is None else rows
    return max(1, math.ceil(rows // world_size / batch_size))


def cfg_steps_per_epoch(train, cfg: TrainConfig, max_history: int, world_size: int = 1) -> int:
    """``steps_per_epoch`` for ``cfg``'s recipe (its epoch coverage decides the rows)."""
    return steps_per_epoch(train, cfg.batch_size, world_size,
                           epoch_rows(train, max_history, cfg.epoch_coverage, cfg.all_positions))


def train_step(model, batch, opt, sched, cfg: TrainConfig, rows: RowMap = whole_rows,
               after_backward: Callable[[], None] | None = None) -> float:
    """One optimisation step; returns the loss. Used as is by the Ray Train worker loop. The forward
    and loss run under ``train.precision`` (bf16: autocast on the model's device). ``after_backward``
    runs before clipping (the DDP worker averages the ID tables' sparse gradients there)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    with autocast(next(model.parameters()).device, cfg.precision):
        loss = compute_loss(model, batch, cfg, rows)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: lower train.lr or check the content vectors")
    loss.backward()
    if after_backward is not None:
        after_backward()
    if cfg.grad_clip > 0:
        clip_gradients(model.parameters(), cfg.grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def run_epoch(model, train: list[np.ndarray], cfg: TrainConfig, max_history: int, opt, sched,
              seed: int, epoch: int, rank: int = 0, world_size: int = 1, progress: bool = True,
              desc: str = "train", rows: RowMap = whole_rows, device: torch.device | None = None,
              after_backward: Callable[[], None] | None = None) -> float:
    """Mean loss over the epoch's batches. ``rank``/``world_size`` shard the users (each worker its
    own batches); ``rows`` instead shares each whole batch's rows out (see ``RowMap``)."""
    total, n = 0.0, 0
    steps = cfg_steps_per_epoch(train, cfg, max_history, world_size)
    core = model.module if hasattr(model, "module") else model
    bar = tqdm(epoch_batches(train, cfg, max_history, seed, epoch, rank, world_size, core.num_items), total=steps,
               desc=desc, disable=not progress, leave=False)
    moved: dict = {}  # the batches' per-epoch constant tensors, moved once (see batch_to)
    for batch in bar:
        if device is not None:
            batch = batch_to(batch, device, moved)
        loss = train_step(model, batch, opt, sched, cfg, rows, after_backward)
        total += loss
        n += 1
        bar.set_postfix(loss=f"{loss:.4f}")
    return total / max(1, n)


def batch_to(batch, device: torch.device, moved: dict | None = None):
    """The batch with every tensor on ``device``. ``moved`` (kept across one epoch's batches) holds
    the fields the batch class names in ``CONSTANT`` (the same tensor every step: the softmax's
    columns and their biases), so each is copied to the device once, not every step."""
    constant = getattr(type(batch), "CONSTANT", ())
    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if moved is not None and f.name in constant:
            hit = moved.get(f.name)
            if hit is None or hit[0] is not value:
                hit = moved[f.name] = (value, value.to(device))
            out[f.name] = hit[1]
        else:
            out[f.name] = value.to(device)
    return dataclasses.replace(batch, **out)


@torch.no_grad()
def user_embeddings(model: TwinTowers, histories: Sequence[np.ndarray], max_history: int,
                    batch_size: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = []
    histories = Ragged.from_arrays(histories)
    order = np.argsort(histories.lengths(), kind="stable")  # similar lengths, less padding
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        tokens = pad_tails(histories, idx, max_history).to(model.content.device)
        out.append(model.user_embedding(tokens))
    model.train(was)
    emb = torch.cat(out) if out else torch.zeros(0, model.cfg.d_out, device=model.content.device)
    result = torch.empty_like(emb)
    result[torch.as_tensor(order, device=emb.device)] = emb
    return result


def training_item_bias(cfg: TrainConfig, train, num_items: int) -> torch.Tensor | None:
    """[N] what the training logit adds to each item's cosine, in cosine units (the column bias /
    ``train.score_scale``), when the recipe trains with one (``train.logit_adjustment``); else None.
    Valid during training ranks by cosine + this bias: the score the towers were trained to rank by
    (the served score adds popularity back only as ``score.popularity_weights`` chooses on valid).
    With member groups, ``valid_item_biases`` scales it to the members that carry it."""
    if cfg.recipe != "full_softmax" or not cfg.logit_adjustment:
        return None
    counts = item_popularity(train, num_items)
    return torch.from_numpy((cfg.logit_adjustment * np.log1p(counts) / cfg.score_scale).astype(np.float32))


def valid_item_biases(cfg: TrainConfig, train, model: TwinTowers,
                      groups: list[list[int]]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """What valid ranks by while training: (the whole towers' bias, each member group's own). A score is
    the mean of its members' cosines, so ``training_item_bias`` is scaled by the share of them whose
    logits carry it (``train.logit_adjustment_members``; None where none does)."""
    full = training_item_bias(cfg, train, model.num_items)
    adjusted = logit_adjusted_members(cfg, model.cfg)

    def scaled(members) -> torch.Tensor | None:
        share = len(adjusted & set(members)) / len(members)
        return full * share if full is not None and share else None

    return scaled(range(model.cfg.members)), [scaled(g) for g in groups]


def with_item_bias(users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None):
    """(users, items) whose inner product is users @ items.T + bias (one more column each)."""
    if bias is None:
        return users, items
    bias = bias.to(items.device, items.dtype).reshape(-1, 1)
    return torch.cat([users, torch.ones_like(users[:, :1])], 1), torch.cat([items, bias], 1)


def ranking_metrics(users: torch.Tensor, items: torch.Tensor, split: EvalSplit, eval_cfg: EvalConfig, prefix: str = "",
                    train_popularity: np.ndarray | None = None, history_penalty: float = 0.0) -> dict[str, float]:
    """``evaluate_both_modes`` of these user and item vectors on ``split`` with ``eval.*``'s settings
    (``history_penalty``: a served history penalty, learn/towers/mix.py)."""
    return evaluate_both_modes(
        users, items, split, ks=eval_cfg.ks, exclude_history=eval_cfg.exclude_history,
        chunk_size=eval_cfg.chunk_size, item_block=eval_cfg.item_block, train_popularity=train_popularity,
        prefix=prefix, popularity_buckets=eval_cfg.popularity_buckets, history_buckets=eval_cfg.history_buckets,
        history_penalty=history_penalty,
    )


def evaluate_model(model: TwinTowers, split: EvalSplit, eval_cfg: EvalConfig, max_history: int,
                   train_popularity: np.ndarray | None = None, prefix: str = "", mix: ScoreMix | None = None,
                   prior: np.ndarray | None = None, towers_prefix: str | None = None,
                   item_bias: torch.Tensor | None = None) -> dict[str, float]:
    """Full-ranking metrics of the towers on ``split``; with a ``mix`` that changes the score
    (``ScoreMix.served``) the served score of learn/towers/mix.py (``prior``:
    learn.towers.mix.popularity_prior of the training split), and with ``towers_prefix`` too the
    towers alone under that prefix (from the same tower vectors).
    ``item_bias`` [N] (no mix): rank by the towers' score + the item's bias (``training_item_bias``)."""
    users = user_embeddings(model, split.histories, max_history)
    items = model.all_item_embeddings()
    if item_bias is not None:
        if mix is not None and mix.served:
            raise ValueError("item_bias is the training-time score: not with a served score mix")
        users, items = with_item_bias(users, items, item_bias)

    def metrics(u: torch.Tensor, i: torch.Tensor, pre: str, penalty: float = 0.0) -> dict[str, float]:
        return ranking_metrics(u, i, split, eval_cfg, pre, train_popularity, penalty)

    if mix is None or not mix.served:
        return metrics(users, items, prefix)
    served = mixed_vectors(model, split, users, items, mix, prior) if mix.enabled else (users, items)
    out = metrics(*served, prefix, mix.history_weight)
    if towers_prefix is not None:
        out.update(metrics(users, items, towers_prefix))
    return out


def group_columns(vectors: torch.Tensor, group: list[int], members: int) -> torch.Tensor:
    """The columns of ``group``'s members in tower outputs [..., d_out] (``members`` concatenated), scaled
    so that a dot product is the mean of those members' cosines: the group's own towers."""
    width = vectors.shape[-1] // members
    cols = torch.cat([torch.arange(m * width, (m + 1) * width, device=vectors.device) for m in group])
    return vectors[..., cols] * (members / len(group)) ** 0.5


def evaluate_groups(model: TwinTowers, split: EvalSplit, eval_cfg: EvalConfig, max_history: int,
                    groups: list[list[int]], prefix: str = "", item_bias: torch.Tensor | None = None,
                    group_bias: Sequence[torch.Tensor | None] | None = None,
                    ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Full-ranking metrics of the whole towers and of each member group's own towers on ``split``
    (``TwinTowers.member_groups``), from one pass of the towers; ``item_bias`` as in ``evaluate_model``,
    for the whole towers, and ``group_bias`` each group's (``valid_item_biases``; default ``item_bias``)."""
    users = user_embeddings(model, split.histories, max_history)
    items = model.all_item_embeddings()
    k = model.cfg.members
    group_bias = [item_bias] * len(groups) if group_bias is None else list(group_bias)

    def metrics(u: torch.Tensor, i: torch.Tensor, bias: torch.Tensor | None) -> dict[str, float]:
        return ranking_metrics(*with_item_bias(u, i, bias), split, eval_cfg, prefix)

    return metrics(users, items, item_bias), [metrics(group_columns(users, g, k), group_columns(items, g, k), b)
                                              for g, b in zip(groups, group_bias, strict=True)]


def mixed_vectors(model: TwinTowers, split: EvalSplit, users: torch.Tensor, items: torch.Tensor, mix: ScoreMix,
                  prior: np.ndarray | None, served_items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, items) of the served score ``mix`` from the towers' vectors of ``split``'s users and
    of the catalog: the concatenation a bundle serves (learn/towers/mix.py). ``served_items``: the
    item side when the caller already has it (the same for mixes of one ``ScoreMix.item_side_key``)."""
    if mix.stores_prior and prior is None:
        raise ValueError("a score mix with a popularity weight or a cold content weight needs the training "
                         "split's prior")
    raw = model.content[1:]  # the raw content vectors, catalog order (row 0 is the pad)
    last = torch.as_tensor(last_items(split.histories), device=raw.device)
    return mix.users(users, raw[last]), mix.items(items, raw, prior) if served_items is None else served_items


def mix_metric_key(key: str, mix: ScoreMix) -> str:
    """The run's metric of ``mix``'s valid ``key``, e.g. score_mix_valid_ndcg_at_10_c0.05_p0.1 (and
    ..._c0.05_p0.1_cold0.5 with a cold content weight, ..._h0.2 with a history penalty)."""
    cold = f"_cold{mix.cold_content_weight:g}" if mix.varies else ""
    history = f"_h{mix.history_weight:g}" if mix.penalises_history else ""
    return f"score_mix_valid_{key}_c{mix.content_weight:g}_p{mix.popularity_weight:g}{cold}{history}"


def choose_score_mix(model: TwinTowers, split: EvalSplit, eval_cfg: EvalConfig, max_history: int,
                     candidates: list[ScoreMix], prior: np.ndarray,
                     key: str = "ndcg_at_10", cold_floor: bool = False,
                     train_popularity: np.ndarray | None = None) -> tuple[ScoreMix, dict[str, float]]:
    """The candidate with the best valid ``key`` on ``split`` (ties: the earlier candidate), and every
    candidate's value as ``score_mix_valid_{key}_c{content}_p{popularity}``. The towers' vectors are
    computed once; each candidate is one full ranking of ``split``.

    ``cold_floor`` (``score.select=cold_floor``; needs ``train_popularity``): the best among the
    candidates whose ``key`` on the valid users with a cold target (unseen in training) is at least
    the untrained last-item floor's on the same users (``score_mix_valid_{key}_pop_cold_floor``;
    each candidate's as ``..._pop_cold_c...``); when none is, or no valid target is cold, the best
    overall as without it."""
    users = user_embeddings(model, split.histories, max_history)
    items = model.all_item_embeddings()
    table: dict[str, float] = {}
    floor = None
    segments = {}
    if cold_floor:
        if train_popularity is None:
            raise ValueError("score.select=cold_floor needs the training split's item popularity")
        from learn.evaluate.baselines import evaluate_baseline

        k = int(key.rsplit("_", 1)[1])
        floor = evaluate_baseline("content_last", model.content[1:].cpu().numpy(), split, eval_cfg, max_history,
                                  train_popularity, "", segment_k=k).get(f"{key}_pop_cold")
        if floor is not None:
            table[f"score_mix_valid_{key}_pop_cold_floor"] = floor
            segments = dict(train_popularity=train_popularity, segment_k=k,
                            popularity_buckets=eval_cfg.popularity_buckets, history_buckets=[])
    best, best_value, best_ok, best_ok_value = None, -math.inf, None, -math.inf
    item_sides: dict[tuple, torch.Tensor] = {}  # one per item side (ScoreMix.item_side_key), not per weight
    for mix in candidates:
        side = mix.item_side_key()
        u, i = mixed_vectors(model, split, users, items, mix, prior, item_sides.get(side)) if mix.enabled \
            else (users, items)
        item_sides[side] = i
        got = evaluate_both_modes(u, i, split, ks=eval_cfg.ks, exclude_history=eval_cfg.exclude_history,
                                  chunk_size=eval_cfg.chunk_size, item_block=eval_cfg.item_block,
                                  history_penalty=mix.history_weight, **segments)
        value = got[key]
        table[mix_metric_key(key, mix)] = value
        if value > best_value:
            best, best_value = mix, value
        if floor is not None:
            cold = got[f"{key}_pop_cold"]
            table[mix_metric_key(f"{key}_pop_cold", mix)] = cold
            if cold >= floor and value > best_ok_value:
                best_ok, best_ok_value = mix, value
    if best_ok is not None:
        best = best_ok
    if best is None:
        raise ValueError("no score mix candidates")
    return best, table
