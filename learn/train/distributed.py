"""Training over several workers: Ray Train ``TorchTrainer`` with DDP, checkpoints and resume.

    result = fit_distributed(model, splits, cfg.train, cfg.eval, max_history, seed=cfg.seed,
                             storage_path=..., run_name=..., tracking=MlflowTarget(uri, run_id))

It trains the way ``learn.train.fit.fit`` does and is meant to give the same numbers:

batches     every worker draws the epoch's *whole* batches exactly as one process does (batch_size is
            the global batch) and computes the towers for its contiguous share of the rows (and of
            the catalog for full_softmax); the tower outputs are all-gathered, so every worker
            computes the very loss one process would (in-batch and dense negatives span the whole
            batch). The gather's backward keeps this worker's slice of the gradient times the world
            size, and DDP averages the parameter gradients over workers, which adds up to the
            one-process gradient. With dropout 0 a run matches ``fit`` up to float rounding; with
            dropout the masks differ (each worker draws its own, reseeded per (seed, epoch, rank)).
            The cost: batch sampling is repeated on every worker (host side, cheap next to the towers).
evaluation  after each due epoch every rank embeds its share of the catalog (gathered: each rank
            holds all item vectors) and ranks its share of the valid users over the whole catalog;
            the exact integer ranks are gathered and every rank computes the same metrics. Rank 0
            keeps the ``FitState`` (best weights, early stopping) exactly as ``fit`` does; the stop
            decision is broadcast to every rank.
memory      the spec (content matrix with its pad row, CSR training sequences, valid split) is put
            in the object store once; on a node the workers map those arrays zero-copy (read-only)
            instead of each holding a copy: the towers use the shared content matrix as their
            buffer (``TwinTowers(..., padded=True)``, left out of DDP's buffer sync), and the
            sequences are a few flat arrays (``Ragged``), not one Python object per user.
checkpoints rank 0 reports each epoch's row with a checkpoint (``state.pt``: model, optimizer and
            scheduler state, and the ``FitState`` as a dict); the other ranks report the epoch without one. On a (re)start every worker
            restores the latest checkpoint and goes on with the next epoch, so a worker failure
            (``FailureConfig(max_failures=train.max_failures)``) costs at most one epoch. Ray Train
            also restores from ``<storage_path>/<run_name>`` when a run of that name exists there.
tracking    the driver keeps its MLflow run; rank 0 logs each epoch's row to that run id (through
            ``MlflowClient``, never ending the run) once the epoch's checkpoint is reported, so a
            restarted group logs no epoch twice; after a restart it first logs the checkpointed
            epochs the run still lacks (a failure can strike between checkpoint and log).
            ``on_epoch``, if given, runs in the driver over the final history (the workers are
            other processes); don't log the same rows through it as well.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from learn.config import EvalConfig, TrainConfig
from learn.data.ragged import Ragged
from learn.data.sequences import EvalSplit, Splits
from learn.towers.model import TowerConfig, TwinTowers
from learn.secrets import with_env_credentials
from learn.tracking.mlflow_run import resolve_uri
from learn.evaluate.metrics import metrics_both_modes, sample_users, target_ranks_both
from learn.train.fit import FitResult, FitState, cpu_state, evaluation_due, finish_groups, freeze_stopped_groups
from learn.train.loop import (cfg_steps_per_epoch, evaluate_groups, evaluate_model, group_columns, make_optimizer,
                              make_scheduler, run_epoch, user_embeddings, valid_item_biases,
                              with_item_bias)
from learn.train.recipes import whole_rows

STATE_FILE = "state.pt"
WorkerHook = Callable[[int, int], None]  # (epoch, world rank), called on every worker as an epoch starts


@dataclass(frozen=True)
class MlflowTarget:
    """An MLflow run the driver holds open; rank 0 logs per-epoch metrics into it."""

    tracking_uri: str = field(repr=False)  # may carry credentials: never printed
    run_id: str


@dataclass
class _Spec:
    """Everything a worker needs, put in the object store once."""

    tower: TowerConfig
    content: np.ndarray  # [1 + num_items, d_llm] raw content vectors, pad row first (the towers' buffer)
    init_state: dict[str, torch.Tensor]
    train: Ragged
    valid: EvalSplit
    train_cfg: TrainConfig
    eval_cfg: EvalConfig
    max_history: int
    seed: int
    tracking: MlflowTarget | None
    hook: WorkerHook | None
    id_known: np.ndarray | None = None  # [num_items] bool: the items with ID vectors (model.item_id_embedding)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts), in rank order.

    Backward keeps this rank's slice times the world size: every rank computes the same loss from
    the gathered rows, and DDP divides the summed parameter gradients by the world size."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        top = max(sizes)
        padded = torch.cat([local, local.new_zeros((top - local.shape[0], *local.shape[1:]))]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.span = (sum(sizes[:rank]), sizes[rank])
        ctx.world = world
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start, n = ctx.span
        return grad[start : start + n] * ctx.world


class ShardedRows:
    """``RowMap`` for DDP: this rank computes ``fn`` on its contiguous share of the rows; the result
    is gathered from all ranks. A rank left without rows runs ``fn`` on one row and keeps none of it,
    so DDP still sees every parameter take part in the step."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        n = tensors[0].shape[0]
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        if hi > lo:
            local = fn(*(t[lo:hi] for t in tensors))
        else:
            local = fn(*(t[:1] for t in tensors))[:0]
        return _GatherRows.apply(local)


@torch.no_grad()
def _all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Rows of every rank concatenated in rank order (no gradient)."""
    return _GatherRows.forward(_NoCtx(), local)


class _NoCtx:
    """Stands in for autograd's ctx when the gather runs without a graph."""


def mean_sparse_gradients(params: list[tuple[str, torch.Tensor]]) -> None:
    """Every rank's sparse gradients of ``params`` (the item ID tables, left out of DDP) replaced by their
    mean over the ranks, DDP's rule, by all-gathering the rows each rank touched: a transfer of the
    batch's rows, not of the tables, on any backend (NCCL has no sparse all-reduce). The tables' rows go
    in one gather (row numbers offset per table), so a step costs two all-gathers whatever the number of
    tables. Call on every rank after backward, in the same order; a parameter that does not train (a
    frozen group, on every rank alike) is skipped, and a rank without a gradient for one sends no rows."""
    live = [p for _, p in params if p.requires_grad]
    if not live:
        return
    if len({tuple(p.shape[1:]) for p in live}) > 1:
        raise ValueError("mean_sparse_gradients: the tables' rows must have one shape")
    world = dist.get_world_size()
    offsets = np.cumsum([0] + [p.shape[0] for p in live])
    rows, values = [], []
    for offset, p in zip(offsets, live):
        if p.grad is not None:
            grad = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
            rows.append(grad.indices()[0] + int(offset))
            values.append(grad.values())
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=live[0].device)
    values = torch.cat(values) if values else live[0].new_zeros((0, *live[0].shape[1:]))
    rows, values = _all_gather_rows(rows.contiguous()), _all_gather_rows(values.contiguous())
    table = torch.searchsorted(torch.as_tensor(offsets, device=rows.device), rows, right=True) - 1
    for t, p in enumerate(live):
        mine = table == t
        p.grad = torch.sparse_coo_tensor((rows[mine] - int(offsets[t])).unsqueeze(0), values[mine] / world,
                                         p.shape).coalesce()


def _all_gather_array(local: np.ndarray) -> np.ndarray:
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return np.concatenate(parts)


def evaluate_sharded(core: TwinTowers, split: EvalSplit, ev: EvalConfig, max_history: int, rank: int,
                     world: int, prefix: str = "", item_bias: torch.Tensor | None = None,
                     groups: list[list[int]] | None = None, group_bias: list[torch.Tensor | None] | None = None):
    """``evaluate_model`` split across the DDP ranks (call on every rank; every rank gets the metrics):
    rank r embeds the r-th share of the catalog and ranks the r-th share of the users (``item_bias``
    as in ``evaluate_model``). With member ``groups``: (the towers' metrics, each group's own), as
    ``learn.train.loop.evaluate_groups``, from the same tower vectors (``group_bias`` as there)."""
    was = core.training
    core.eval()
    n = core.num_items
    lo, hi = n * rank // world, n * (rank + 1) // world
    device = core.content.device
    local = (core.item_embedding(torch.arange(lo, hi, device=device)) if hi > lo
             else core.item_embedding(torch.arange(0, 1, device=device))[:0])
    items = _all_gather_rows(local.contiguous())
    core.train(was)
    rows = np.array_split(np.arange(len(split)), world)[rank]
    part = split.subset(rows)
    users = user_embeddings(core, part.histories, max_history)

    def metrics(u: torch.Tensor, i: torch.Tensor, bias: torch.Tensor | None) -> dict[str, float]:
        u, i = with_item_bias(u, i, bias)
        incl, excl = target_ranks_both(u, i, part.targets, part.histories, chunk_size=ev.chunk_size,
                                       item_block=ev.item_block)
        return metrics_both_modes(_all_gather_array(incl), _all_gather_array(excl), split, ks=ev.ks,
                                  exclude_history=ev.exclude_history, prefix=prefix,
                                  popularity_buckets=ev.popularity_buckets, history_buckets=ev.history_buckets)

    whole = metrics(users, items, item_bias)
    if groups is None:
        return whole
    k = core.cfg.members
    group_bias = [item_bias] * len(groups) if group_bias is None else group_bias
    return whole, [metrics(group_columns(users, g, k), group_columns(items, g, k), b)
                   for g, b in zip(groups, group_bias, strict=True)]


def absolute_tracking_uri(uri: str) -> str:
    """Workers may run in another directory: make a relative sqlite file or local path absolute.
    Workers may not share this process's environment either: a server URI carries this process's
    MLflow credentials (in memory only; ``_log_to_mlflow`` moves them back out of the URI)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).resolve())
    return with_env_credentials(uri)


def _log_to_mlflow(target: MlflowTarget, rows: list[dict[str, float]]) -> None:
    """Each row's metrics at step = its epoch, in one batch."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(row["epoch"])) for row in rows for k, v in row.items()
               if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    client = MlflowClient(tracking_uri=resolve_uri(target.tracking_uri))
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(target.run_id, metrics=metrics[start : start + 1000])


def _log_missing_epochs(target: MlflowTarget, history: list[dict[str, float]]) -> None:
    """After a restart: log the checkpointed epochs the run lacks (a failure between an epoch's
    checkpoint and its logging, e.g. the group torn down for another rank's error)."""
    from mlflow import MlflowClient

    logged = {m.step for m in MlflowClient(tracking_uri=resolve_uri(target.tracking_uri)).get_metric_history(
        target.run_id, "train_loss")}
    missing = [row for row in history if int(row["epoch"]) not in logged]
    if missing:
        _log_to_mlflow(target, missing)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, 7]).generate_state(1)[0])


def _load_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: one DDP worker from (re)start to the last epoch or early stop."""
    import ray
    import ray.train
    import ray.train.torch

    spec: _Spec = ray.get(config["spec"])
    tc, ev = spec.train_cfg, spec.eval_cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)

    with warnings.catch_warnings():  # the shared matrix is read-only: the towers never write it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        content = torch.from_numpy(spec.content)
    known = None if spec.id_known is None else torch.from_numpy(spec.id_known)
    model = TwinTowers(spec.tower, content, id_known=known, padded=True)
    # the item ID tables: sparse gradients, averaged over the ranks by mean_sparse_gradients, not by DDP
    id_tables = [(name, p) for name, p in model.named_parameters() if ".id_embedding." in name]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["content", *(n for n, _ in id_tables)])
    model.load_state_dict(spec.init_state)
    checkpoint = ray.train.get_checkpoint()
    saved = _load_state(checkpoint) if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
    groups = model.member_groups()
    # the content buffers never change: no per-step buffer broadcast; the item head takes no part
    # in any loss when the item side is raw content and the user side has its own head, and a member
    # group that has stopped takes no part in any (with several groups)
    unused = (spec.tower.item_tower == "c" and spec.tower.user_head == "separate") or len(groups) > 1
    ddp = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"forward_sync_buffers": False, "find_unused_parameters": unused})
    core: TwinTowers = ddp.module if hasattr(ddp, "module") else ddp
    device = next(core.parameters()).device
    opt = make_optimizer(core, tc)
    sched = make_scheduler(opt, tc, cfg_steps_per_epoch(spec.train, tc, spec.max_history))
    # one group: rank 0 keeps the fit state and decides for all. Several member groups: every rank keeps
    # it (every rank gets the same valid metrics), so each freezes its own replica of a stopped group
    state = FitState.start(tc, ev, groups)
    keeps_state = rank == 0 or bool(state.groups)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = FitState.from_dict(saved["fit"])
        freeze_stopped_groups(core, state, log=False)  # the checkpoint's weights have them at their best
        if rank == 0:
            print(f"[train] resumed from the checkpoint of epoch {state.epoch}", flush=True)
            if spec.tracking is not None:
                _log_missing_epochs(spec.tracking, state.history)
    rows = ShardedRows(rank, world) if world > 1 else whole_rows
    sync_ids = (lambda: mean_sparse_gradients(id_tables)) if world > 1 and id_tables else None
    bias, group_bias = valid_item_biases(tc, spec.train, core, state.groups)  # valid ranks as training scores
    for epoch in range(state.epoch + 1, (state.epoch if state.stopped else tc.epochs) + 1):
        if spec.hook is not None:
            spec.hook(epoch, rank)
        torch.manual_seed(_epoch_seed(spec.seed, epoch, rank))  # dropout masks: the same after a restart
        loss = run_epoch(ddp, spec.train, tc, spec.max_history, opt, sched, spec.seed, epoch, progress=False,
                         rows=rows, device=device, after_backward=sync_ids)
        row: dict[str, float] = {"epoch": epoch, "train_loss": loss, "lr": sched.get_last_lr()[0]}
        stop = False
        valid = group_valid = None
        if evaluation_due(epoch, tc):
            if world > 1:
                got = evaluate_sharded(core, spec.valid, ev, spec.max_history, rank, world, prefix="valid_",
                                       item_bias=bias, groups=state.groups or None, group_bias=group_bias)
                valid, group_valid = got if state.groups else (got, None)
            elif state.groups:
                valid, group_valid = evaluate_groups(core, spec.valid, ev, spec.max_history, state.groups,
                                                     prefix="valid_", item_bias=bias, group_bias=group_bias)
            else:
                valid = evaluate_model(core, spec.valid, ev, spec.max_history, prefix="valid_", item_bias=bias)
        if keeps_state:
            stop = state.end_epoch(epoch, row, valid, core, group_valid)
            if rank == 0:
                print(state.describe(row), flush=True)
            freeze_stopped_groups(core, state, log=rank == 0)
        if world > 1:
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        state.epoch, state.stopped = epoch, stop
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": cpu_state(core), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "fit": state.to_dict()}, Path(d) / STATE_FILE)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
            if spec.tracking is not None:
                _log_to_mlflow(spec.tracking, [row])
        else:
            ray.train.report({"epoch": epoch, "train_loss": loss})
        if world > 1:
            # no rank starts the next epoch before rank 0 has written this epoch's checkpoint: a rank
            # failing early in epoch e+1 then restarts the group from epoch e, not from scratch
            dist.barrier()
        if stop:
            break


def make_spec(model: TwinTowers, splits: Splits, train_cfg: TrainConfig, eval_cfg: EvalConfig, max_history: int,
              seed: int = 0, tracking: MlflowTarget | None = None, hook: WorkerHook | None = None) -> _Spec:
    """What the workers receive (through the object store, once): flat arrays, no per-user objects."""
    known = model.id_known[1:].cpu().numpy() if model.cfg.num_id_items else None
    return _Spec(tower=copy.deepcopy(model.cfg), content=model.content.detach().cpu().numpy(),
                 init_state=cpu_state(model), train=Ragged.from_arrays(splits.train),
                 valid=sample_users(splits.valid, eval_cfg.valid_max_users, seed), train_cfg=train_cfg,
                 eval_cfg=eval_cfg, max_history=max_history, seed=seed, tracking=tracking, hook=hook, id_known=known)


def fit_distributed(model: TwinTowers, splits: Splits, train_cfg: TrainConfig, eval_cfg: EvalConfig,
                    max_history: int, seed: int = 0, *, storage_path: str | Path, run_name: str | None = None,
                    tracking: MlflowTarget | None = None,
                    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                    worker_hook: WorkerHook | None = None) -> FitResult:
    """``fit`` on ``train_cfg.num_workers`` Ray Train workers (DDP); the best weights are loaded into
    ``model`` at the end, as ``fit`` does.

    Workers start from ``model``'s current weights. Checkpoints go to ``<storage_path>/<run_name>``
    (a fresh unique name when None; an existing run of that name is resumed). Starts a local Ray
    instance if none is connected."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray

    start = time.perf_counter()
    if tracking is not None:
        tracking = MlflowTarget(absolute_tracking_uri(tracking.tracking_uri), tracking.run_id)
    spec = make_spec(model, splits, train_cfg, eval_cfg, max_history, seed, tracking, worker_hook)
    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": ray.put(spec)},
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu),
        run_config=RunConfig(
            name=run_name or f"learn-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("distributed training finished without a checkpoint (no epoch ran)")
    saved = _load_state(result.checkpoint)
    state = FitState.from_dict(saved["fit"])
    model.load_state_dict(saved["model"])
    state.restore_best(model)
    if state.groups:  # every group at its own best epoch: score that ensemble, as fit does
        finish_groups(model, state, sample_users(splits.valid, eval_cfg.valid_max_users, seed), eval_cfg,
                      max_history, valid_item_biases(train_cfg, splits.train, model, [])[0])
    if on_epoch is not None:
        for row in state.history:
            on_epoch(int(row["epoch"]), row)
    return state.result(time.perf_counter() - start)
