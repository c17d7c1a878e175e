"""Training in one process: the reference path (the Ray Train loop calls the same pieces).

    state = fit(model, splits, cfg.train, cfg.eval, max_history, num_items, on_epoch=...)

``train_step`` is one optimisation step on one batch; ``run_epoch`` draws the epoch's batches and
steps through them; ``fit`` adds evaluation on the valid split, early stopping on valid NDCG@10 and
restores the best weights. ``learn.train.distributed`` runs the same steps under DDP: every worker
draws the whole batch and computes the towers for its share of the rows (see ``RowMap``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from learn.config import EvalConfig, TrainConfig
from learn.data.sequences import EvalSplit, Splits
from learn.towers.losses import dense_all_action_loss, full_softmax_loss, in_batch_softmax_loss
from learn.towers.model import TwinTowers, member_slices, pad_histories
from learn.train.batches import DenseBatch, PairBatch, dense_batches, pair_batches

RowMap = Callable[..., torch.Tensor]
"""``rows(fn, *tensors)``: ``fn`` over the rows of ``tensors`` (all cut alike on dim 0), the outputs
concatenated on dim 0 in row order. ``whole_rows`` calls ``fn`` once; the DDP version computes only
this worker's rows and gathers the rest, so every worker ends with the whole result."""


def whole_rows(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    return fn(*tensors)


def selection_key(eval_cfg: EvalConfig) -> str:
    """The valid metric early stopping and best-epoch selection use."""
    return "ndcg_at_10" if 10 in eval_cfg.ks else f"ndcg_at_{min(eval_cfg.ks)}"


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
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


def steps_per_epoch(train: list[np.ndarray], batch_size: int, world_size: int = 1) -> int:
    users = sum(1 for s in train if len(s) >= 2) // world_size
    return max(1, math.ceil(users / batch_size))


def epoch_batches(train: list[np.ndarray], cfg: TrainConfig, max_history: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1):
    """The epoch's batches for this worker: the user order depends on (seed, epoch) only, so every
    DDP worker shuffles alike and the shards stay disjoint; sampling within a shard is per worker."""
    order_rng = np.random.default_rng([seed, epoch])
    rng = np.random.default_rng([seed, epoch, rank, 1])
    if cfg.recipe == "dense_all_action":
        return dense_batches(train, batch_size=cfg.batch_size, max_history=max_history, target_len=cfg.target_len,
                             n_history=cfg.n_history, n_targets=cfg.n_targets, recency=cfg.recency_weighting,
                             rng=rng, order_rng=order_rng, rank=rank, world_size=world_size)
    low = "one" if cfg.recipe == "full_softmax" else "half"
    return pair_batches(train, batch_size=cfg.batch_size, max_history=max_history, low=low,
                        all_positions=cfg.all_positions, rng=rng, order_rng=order_rng, rank=rank,
                        world_size=world_size)


def compute_loss(model: TwinTowers, batch, cfg: TrainConfig, rows: RowMap = whole_rows) -> torch.Tensor:
    """The recipe's loss over the whole batch; the tower outputs it needs are computed through ``rows``."""
    core = model.module if hasattr(model, "module") else model
    k = core.cfg.members

    def per_member(loss_fn: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor, *rest) -> torch.Tensor:
        # each member is trained on its own slice, as if alone (an ensemble, not one wide model)
        return torch.stack([loss_fn(x, y, *rest) for x, y in zip(member_slices(a, k), member_slices(b, k))]).mean()

    if isinstance(batch, DenseBatch):
        def at(out: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return out[torch.arange(out.shape[0], device=out.device).unsqueeze(1), pos]

        hist = rows(lambda tokens, pos: at(model(tokens), pos), batch.hist_tokens, batch.hist_pos)
        tgt = rows(lambda tokens, pos: at(core.target_sequence_embedding(tokens), pos), batch.tgt_tokens,
                   batch.tgt_pos)
        return per_member(lambda h, t: dense_all_action_loss(h, batch.hist_valid, t, batch.tgt_valid, batch.tgt_items,
                                                             cfg.score_scale), hist, tgt)
    assert isinstance(batch, PairBatch)

    def user_vectors(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = model(tokens)  # ids: the (consecutive) batch rows these tokens are
        keep = (batch.rows >= ids[0]) & (batch.rows <= ids[-1])
        return out[batch.rows[keep] - ids[0], batch.positions[keep]]

    user = rows(user_vectors, batch.tokens, torch.arange(batch.tokens.shape[0], device=batch.tokens.device))
    if cfg.recipe == "full_softmax":
        items = rows(core.item_embedding, torch.arange(core.num_items, device=user.device))
        return per_member(full_softmax_loss, user, items, batch.targets, cfg.score_scale)
    target_vecs = rows(core.item_embedding, batch.targets)
    return per_member(in_batch_softmax_loss, user, target_vecs, batch.targets, cfg.score_scale, batch.rows)


def train_step(model, batch, opt, sched, cfg: TrainConfig, rows: RowMap = whole_rows) -> float:
    """One optimisation step; returns the loss. Used as is by the Ray Train worker loop."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = compute_loss(model, batch, cfg, rows)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: lower train.lr or check the content vectors")
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def run_epoch(model, train: list[np.ndarray], cfg: TrainConfig, max_history: int, opt, sched,
              seed: int, epoch: int, rank: int = 0, world_size: int = 1, progress: bool = True,
              desc: str = "train", rows: RowMap = whole_rows, device: torch.device | None = None) -> float:
    """Mean loss over the epoch's batches. ``rank``/``world_size`` shard the users (each worker its
    own batches); ``rows`` instead shares each whole batch's rows out (see ``RowMap``)."""
    total, n = 0.0, 0
    steps = steps_per_epoch(train, cfg.batch_size, world_size)
    bar = tqdm(epoch_batches(train, cfg, max_history, seed, epoch, rank, world_size), total=steps, desc=desc,
               disable=not progress, leave=False)
    for batch in bar:
        if device is not None:
            batch = batch_to(batch, device)
        loss = train_step(model, batch, opt, sched, cfg, rows)
        total += loss
        n += 1
        bar.set_postfix(loss=f"{loss:.4f}")
    return total / max(1, n)


def batch_to(batch, device: torch.device):
    """The batch with every tensor on ``device``."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device)
                                         for f in dataclasses.fields(batch)})


@torch.no_grad()
def user_embeddings(model: TwinTowers, histories: list[np.ndarray], max_history: int,
                    batch_size: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = []
    order = np.argsort([len(h) for h in histories], kind="stable")  # similar lengths, less padding
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        tokens = pad_histories([histories[i] for i in idx], max_history).to(model.content.device)
        out.append(model.user_embedding(tokens))
    model.train(was)
    emb = torch.cat(out) if out else torch.zeros(0, model.cfg.d_out, device=model.content.device)
    result = torch.empty_like(emb)
    result[torch.as_tensor(order, device=emb.device)] = emb
    return result


def evaluate_model(model: TwinTowers, split: EvalSplit, eval_cfg: EvalConfig, max_history: int,
                   train_popularity: np.ndarray | None = None, prefix: str = "") -> dict[str, float]:
    from learn.evaluate import evaluate_both_modes

    users = user_embeddings(model, split.histories, max_history)
    items = model.all_item_embeddings()
    return evaluate_both_modes(
        users, items, split, ks=eval_cfg.ks, exclude_history=eval_cfg.exclude_history,
        chunk_size=eval_cfg.chunk_size, train_popularity=train_popularity, prefix=prefix,
        popularity_buckets=eval_cfg.popularity_buckets, history_buckets=eval_cfg.history_buckets,
    )


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def fit(model: TwinTowers, splits: Splits, train_cfg: TrainConfig, eval_cfg: EvalConfig, max_history: int,
        seed: int = 0, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True) -> FitResult:
    """Train with early stopping on valid NDCG@10; the best weights are loaded back at the end."""
    start = time.perf_counter()
    opt = make_optimizer(model, train_cfg)
    sched = make_scheduler(opt, train_cfg, steps_per_epoch(splits.train, train_cfg.batch_size))
    key = selection_key(eval_cfg)
    best_score, best_epoch, best_state, best_valid = -1.0, -1, None, {}
    history: list[dict[str, float]] = []
    bad_epochs = 0
    stopped = False
    bar = tqdm(range(1, train_cfg.epochs + 1), desc="epochs", disable=not progress)
    for epoch in bar:
        loss = run_epoch(model, splits.train, train_cfg, max_history, opt, sched, seed, epoch, progress=progress,
                         desc=f"epoch {epoch}")
        row = {"epoch": epoch, "train_loss": loss, "lr": sched.get_last_lr()[0]}
        if epoch % train_cfg.eval_every == 0 or epoch == train_cfg.epochs:
            valid = evaluate_model(model, splits.valid, eval_cfg, max_history, prefix="valid_")
            row.update(valid)
            score = valid[f"valid_{key}"]
            if score > best_score:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                best_valid = valid
            else:
                bad_epochs += 1
        history.append(row)
        bar.set_postfix(loss=f"{loss:.4f}", valid_ndcg10=f"{row.get(f'valid_{key}', float('nan')):.4f}",
                        best=best_epoch)
        print(f"epoch {epoch:3d}  loss {loss:.4f}  valid {key} {row.get(f'valid_{key}', float('nan')):.4f}"
              f"  recall_at_10 {row.get('valid_recall_at_10', float('nan')):.4f}  (best epoch {best_epoch})",
              flush=True)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if train_cfg.patience > 0 and bad_epochs >= train_cfg.patience:
            stopped = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch, best_valid=best_valid, history=history, stopped_early=stopped,
                     seconds=time.perf_counter() - start)
