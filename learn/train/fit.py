"""Fitting with early stopping: one ``FitState`` kept by the one-process loop (``fit`` below) and by
every Ray Train worker (``learn.train.distributed``), so both stop, select and restore alike.

    result = fit(model, splits, cfg.train, cfg.eval, max_history, seed=cfg.seed, on_epoch=...)

After each due evaluation (every ``train.eval_every`` epochs and at the last one) the valid metric
``selection_key`` is compared with the best so far; the best epoch's weights are kept, and after
``train.patience`` evaluations without a better one training stops (0 = never). The best weights
are loaded back at the end.

Towers whose members form several groups (``TwinTowers.member_groups``: content-only members and members
with item ID vectors, ``model.id_members``) are early-stopped per group: each group is ranked on valid
by its own members, keeps its own best epoch's weights and stops after its own ``train.patience``
evaluations without a better one; the one-process loop then freezes it (its best weights back, no more
updates, no forward while training). Training ends when every group has stopped, and the result is
every group at its own best epoch; ``best_valid`` is that ensemble's valid score.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from learn.config import EvalConfig, TrainConfig
from learn.data.sequences import Splits
from learn.device import resolve_device
from learn.evaluate.metrics import sample_users
from learn.train.loop import (cfg_steps_per_epoch, evaluate_groups, evaluate_model, make_optimizer, make_scheduler,
                              run_epoch, valid_item_biases)

OnEpoch = Callable[[int, dict[str, float]], None]


def selection_key(eval_cfg: EvalConfig, train_cfg: TrainConfig | None = None) -> str:
    """The valid metric early stopping and best-epoch selection use: NDCG@10 in the configured history mode;
    with ``train.history_negatives=false`` (towers not trained to rank a user's own items down) NDCG@10
    with history excluded, what such towers are trained to rank."""
    key = "ndcg_at_10" if 10 in eval_cfg.ks else f"ndcg_at_{min(eval_cfg.ks)}"
    if train_cfg is not None and not train_cfg.history_negatives and not eval_cfg.exclude_history:
        key += "_excl_hist"
    return key


def evaluation_due(epoch: int, cfg: TrainConfig) -> bool:
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


def cpu_state(module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state (only the keys starting with one of ``prefixes`` when given)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()
            if prefixes is None or k.startswith(prefixes)}


def group_prefixes(group: list[int]) -> tuple[str, ...]:
    """The state-dict key prefixes of a member group's stacks."""
    return tuple(f"stacks.{m}." for m in group)


GROUP_NAMES = {2: ["content", "ids"]}  # member_groups' order: content-only members, then members with IDs


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


@dataclass
class FitState:
    """Where a fit stands after ``epoch``; plain data, so it is also the checkpoint's content."""

    key: str  # e.g. "valid_ndcg_at_10"
    patience: int
    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    best_valid: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False
    # member groups early-stopped apart (empty: the whole model is one group); per group, in order:
    groups: list[list[int]] = field(default_factory=list)
    group_best_score: list[float] = field(default_factory=list)
    group_best_epoch: list[int] = field(default_factory=list)
    group_bad_epochs: list[int] = field(default_factory=list)
    group_stopped: list[bool] = field(default_factory=list)
    group_best_state: list[dict[str, torch.Tensor] | None] = field(default_factory=list)

    @classmethod
    def start(cls, train_cfg: TrainConfig, eval_cfg: EvalConfig, groups: list[list[int]] | None = None) -> "FitState":
        """``groups``: the model's ``member_groups``; with more than one each is early-stopped on its own."""
        state = cls(key=f"valid_{selection_key(eval_cfg, train_cfg)}", patience=train_cfg.patience)
        if groups and len(groups) > 1:
            n = len(groups)
            state.groups = [list(g) for g in groups]
            state.group_best_score, state.group_best_epoch = [-1.0] * n, [-1] * n
            state.group_bad_epochs, state.group_stopped, state.group_best_state = [0] * n, [False] * n, [None] * n
        return state

    def end_epoch(self, epoch: int, row: dict[str, float], valid: dict[str, float] | None,
                  model: torch.nn.Module, group_valid: list[dict[str, float]] | None = None) -> bool:
        """Record epoch ``epoch``'s ``row`` (and its valid metrics when it was evaluated); keep the
        weights of ``model`` if they are the best so far. Returns whether training stops now.
        With member groups, ``group_valid`` holds each group's own valid metrics: each group keeps its own
        best weights and stops on its own; training stops when every group has."""
        if self.groups:
            return self._end_epoch_groups(epoch, row, valid, model, group_valid)
        if valid is not None:
            row.update(valid)
            if valid[self.key] > self.best_score:
                self.best_score, self.best_epoch, self.bad_epochs = valid[self.key], epoch, 0
                self.best_state, self.best_valid = cpu_state(model), valid
            else:
                self.bad_epochs += 1
        self.history.append(row)
        self.epoch = epoch
        self.stopped = self.patience > 0 and self.bad_epochs >= self.patience
        return self.stopped

    def _end_epoch_groups(self, epoch: int, row: dict[str, float], valid: dict[str, float] | None,
                          model: torch.nn.Module, group_valid: list[dict[str, float]] | None) -> bool:
        if valid is not None:
            if group_valid is None or len(group_valid) != len(self.groups):
                raise ValueError(f"member groups {self.group_names}: every evaluation needs each group's valid metrics")
            row.update(valid)
            for g, got in enumerate(group_valid):
                row[f"{self.key}_{self.group_names[g]}"] = got[self.key]
                if self.group_stopped[g]:
                    continue
                if got[self.key] > self.group_best_score[g]:
                    self.group_best_score[g], self.group_best_epoch[g] = got[self.key], epoch
                    self.group_bad_epochs[g] = 0
                    self.group_best_state[g] = cpu_state(model, group_prefixes(self.groups[g]))
                else:
                    self.group_bad_epochs[g] += 1
                self.group_stopped[g] = self.patience > 0 and self.group_bad_epochs[g] >= self.patience
            self.best_epoch = max(self.group_best_epoch)
        self.history.append(row)
        self.epoch = epoch
        self.stopped = all(self.group_stopped)
        return self.stopped

    @property
    def group_names(self) -> list[str]:
        """The groups' names in metric keys: content and ids for member_groups' two groups."""
        n = len(self.groups)
        return GROUP_NAMES.get(n, [f"group{g}" for g in range(n)])

    def describe(self, row: dict[str, float]) -> str:
        nan = float("nan")
        line = (f"epoch {int(row['epoch']):3d}  loss {row['train_loss']:.4f}  {self.key} {row.get(self.key, nan):.4f}"
                f"  recall_at_10 {row.get('valid_recall_at_10', nan):.4f}")
        if not self.groups:
            return line + f"  (best epoch {self.best_epoch})"
        return line + "".join(
            f"  {name} {row.get(f'{self.key}_{name}', nan):.4f} (best epoch {best}{', stopped' if stopped else ''})"
            for name, best, stopped in zip(self.group_names, self.group_best_epoch, self.group_stopped))

    def restore_best(self, model: torch.nn.Module) -> None:
        if self.groups:
            for g in range(len(self.groups)):
                self.restore_group(model, g)
        elif self.best_state is not None:
            model.load_state_dict(self.best_state)

    def restore_group(self, model: torch.nn.Module, g: int) -> None:
        """Group ``g``'s best weights back into ``model`` (the other groups' stay as they are)."""
        if self.group_best_state[g] is not None:
            prefixes = group_prefixes(self.groups[g])
            missing = {k for k in model.state_dict() if k.startswith(prefixes)} - set(self.group_best_state[g])
            if missing:
                raise ValueError(f"member group {self.group_names[g]}: saved weights lack {sorted(missing)[:3]}")
            model.load_state_dict(self.group_best_state[g], strict=False)

    def result(self, seconds: float) -> FitResult:
        return FitResult(best_epoch=self.best_epoch, best_valid=self.best_valid, history=self.history,
                         stopped_early=self.stopped, seconds=seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitState":
        return cls(**data)


def pretrain_config(train_cfg: TrainConfig) -> TrainConfig:
    """The first stage of a two-stage fit (``train.pretrain_epochs`` > 0): ``train.pretrain_recipe`` for
    up to that many epochs, at ``train.pretrain_batch_size`` (0: ``train.batch_size``)."""
    return dataclasses.replace(train_cfg, recipe=train_cfg.pretrain_recipe, epochs=train_cfg.pretrain_epochs,
                               batch_size=train_cfg.pretrain_batch_size or train_cfg.batch_size, pretrain_epochs=0)


def fit(model, splits: Splits, train_cfg: TrainConfig, eval_cfg: EvalConfig, max_history: int, seed: int = 0,
        on_epoch: OnEpoch | None = None, progress: bool = True) -> FitResult:
    """Train in this process with early stopping on the valid split; the best weights are loaded back.
    The model moves to ``train.device`` (and stays there: ``export_towers`` copies it to CPU).

    Two stages when ``train.pretrain_epochs`` > 0 (the paper's Amazon schedule): the pre-training
    recipe first, with its own early stopping; then ``train.recipe`` from the best pre-training
    weights with a fresh optimiser and schedule. Epochs are numbered on across both stages (each row
    says its ``stage``: 1 or 2), and selection runs over both: if fine-tuning never beats the best
    pre-training epoch on valid, the pre-trained weights are the result."""
    start = time.perf_counter()
    device = resolve_device(train_cfg.device, "train.device")
    model.to(device)
    valid_split = sample_users(splits.valid, eval_cfg.valid_max_users, seed)  # fixed for the whole fit
    state = FitState.start(train_cfg, eval_cfg, model.member_groups())
    stages = [(train_cfg, 0)]
    if state.groups and train_cfg.pretrain_epochs > 0:
        raise ValueError("member groups (model.id_members) stop apart: not with a two-stage fit "
                         "(train.pretrain_epochs > 0)")
    if train_cfg.pretrain_epochs > 0:
        stages = [(pretrain_config(train_cfg), 1), (dataclasses.replace(train_cfg, pretrain_epochs=0), 2)]
    for cfg, stage in stages:
        if stage == 2:
            print(f"[train] stage 2: {cfg.recipe} from the best pre-training epoch ({state.best_epoch})", flush=True)
            state.restore_best(model)
            state.bad_epochs, state.stopped = 0, False
        _fit_stage(model, splits, cfg, max_history, seed, state, valid_split, eval_cfg, device, on_epoch, progress,
                   stage)
    state.restore_best(model)
    if state.groups:
        finish_groups(model, state, valid_split, eval_cfg, max_history,
                      valid_item_biases(train_cfg, splits.train, model, [])[0])
    return state.result(time.perf_counter() - start)


def finish_groups(model, state: FitState, valid_split, eval_cfg: EvalConfig, max_history: int, bias) -> None:
    """After ``restore_best`` with member groups: every group trainable again, and ``best_valid`` the
    valid score of the ensemble of the groups at their own best epochs."""
    model.frozen_members = frozenset()
    for p in model.parameters():
        p.requires_grad_(True)
    state.best_valid = evaluate_model(model, valid_split, eval_cfg, max_history, prefix="valid_", item_bias=bias)
    state.best_score = state.best_valid[state.key]
    print(f"[train] member groups at their best epochs ("
          f"{', '.join(f'{n} {e}' for n, e in zip(state.group_names, state.group_best_epoch))}): "
          f"{state.key} {state.best_score:.4f}", flush=True)


def freeze_stopped_groups(model, state: FitState, log: bool = True) -> None:
    """Each group that has stopped gets its best weights back and trains no more (no gradient, no
    forward while training: ``TwinTowers.frozen_members``)."""
    for g, stopped in enumerate(state.group_stopped):
        if stopped and not set(state.groups[g]) <= model.frozen_members:
            state.restore_group(model, g)
            for m in state.groups[g]:
                for p in model.stacks[m].parameters():
                    p.requires_grad_(False)
            model.frozen_members = model.frozen_members | frozenset(state.groups[g])
            if log:
                print(f"[train] member group {state.group_names[g]} stopped: its best epoch "
                      f"{state.group_best_epoch[g]} kept", flush=True)


def _fit_stage(model, splits: Splits, train_cfg: TrainConfig, max_history: int, seed: int, state: FitState,
               valid_split, eval_cfg: EvalConfig, device, on_epoch: OnEpoch | None, progress: bool, stage: int) -> None:
    """Up to ``train_cfg.epochs`` epochs of one recipe, numbered after ``state.epoch``."""
    opt = make_optimizer(model, train_cfg)
    sched = make_scheduler(opt, train_cfg, cfg_steps_per_epoch(splits.train, train_cfg, max_history))
    first = state.epoch
    bias, group_bias = valid_item_biases(train_cfg, splits.train, model, state.groups)  # the training scores
    bar = tqdm(range(first + 1, first + train_cfg.epochs + 1), desc="epochs" if not stage else f"stage {stage} epochs",
               disable=not progress)
    for epoch in bar:
        # the batches' RNG is seeded by the epoch number, numbered on across stages: stage 2 draws afresh
        loss = run_epoch(model, splits.train, train_cfg, max_history, opt, sched, seed, epoch,
                         progress=progress, desc=f"epoch {epoch}", device=device)
        row = {"epoch": epoch, "train_loss": loss, "lr": sched.get_last_lr()[0]}
        if stage:
            row["stage"] = stage
        valid = group_valid = None
        if evaluation_due(epoch - first, train_cfg):
            if state.groups:
                valid, group_valid = evaluate_groups(model, valid_split, eval_cfg, max_history, state.groups,
                                                     prefix="valid_", item_bias=bias, group_bias=group_bias)
            else:
                valid = evaluate_model(model, valid_split, eval_cfg, max_history, prefix="valid_", item_bias=bias)
        stop = state.end_epoch(epoch, row, valid, model, group_valid)
        bar.set_postfix(loss=f"{loss:.4f}", valid=f"{row.get(state.key, float('nan')):.4f}", best=state.best_epoch)
        print(state.describe(row), flush=True)
        if state.groups:
            freeze_stopped_groups(model, state)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if stop:
            break
