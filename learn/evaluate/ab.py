"""The rules of an A/B comparison of two logged retrievers on one evaluation dataset (the flow is
flows/compare.py).

A reference is a run id or a model URI (``models:/learn-retriever@champion``,
``models:/learn-retriever/3``; see learn/registry.py). The challenger (B) is usually trained on
newer data than the champion (A), so the two need not share a dataset; the rules:

- **One evaluation dataset.** ``data`` (a dataset path) or by default B's saved training data.
  The split (kind, time cut, seed) and ``exclude_history`` come from B's saved config (with
  ``data.path`` replaced by ``data``); both models are scored on the same users of that split,
  each reading a history with its own ``max_history``.
- **One catalog.** Each bundle's items are matched to the evaluation catalog by item id. Targets
  are ranked, by both models, among the items all three hold (the common catalog); history
  exclusion removes the history items of that catalog.
- **Users, counted in the result and the logged run.** A user whose target one model cannot
  serve (not in its bundle) is dropped (``users_dropped_target_a`` / ``_b``). A history item a
  model does not hold is skipped, as the served retriever skips it (``users_partial_history_a`` /
  ``_b`` count the users affected); a user left with no history item a model holds has no vector
  for it and is dropped (``users_dropped_no_history_a`` / ``_b``). ``n_users`` remain; none
  remaining is refused.
- **No leakage.** A model must not have seen an evaluation target. Each model's training split is
  rebuilt from its saved config (the evaluation's own split when its dataset fingerprint and split
  settings are the evaluation's), after checking the data still has the fingerprint the bundle
  records. What a model has seen of a user (matched by user id) is its training sequence plus its
  valid target (early stopping); a model that has seen a user's target item more often than a model
  trained on the evaluation split would have (its training sequence plus valid target) was trained
  on it: refused, naming the model, its training data and the evaluation data. A model whose
  training data no longer loads as it was (missing, or changed since) cannot be checked: refused.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from learn.config import Config, EvalConfig, config_from_dict
from learn.data.load import load_sequences
from learn.data.schema import DataError
from learn.data.sequences import EvalSplit, SequenceData, Splits
from learn.evaluate.metrics import target_ranks
from learn.export.bundle import Bundle
from learn.export.manifest import ArtifactError


class ComparisonError(ValueError):
    """A reference does not resolve, or the two models cannot be compared."""


def saved_config(bundle: Bundle, who: str) -> Config:
    try:
        saved = bundle.info.require_config(f"comparing {who}")
    except ArtifactError as exc:
        raise ComparisonError(str(exc)) from None
    return config_from_dict(saved, f"the saved config of {who}")


def split_key(cfg: Config) -> tuple:
    return cfg.data.split, cfg.data.time_cut, cfg.seed


def split_of(cfg: Config, data: SequenceData) -> Splits:
    return data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)


def training_data(bundle: Bundle, cfg: Config, who: str, ev_cfg: Config, ev_data: SequenceData, ev_splits: Splits,
              ev_fingerprint: str) -> tuple[SequenceData, Splits]:
    """The data and split ``bundle``'s towers were trained on, as they were."""
    if bundle.info.dataset_fingerprint == ev_fingerprint and split_key(cfg) == split_key(ev_cfg):
        return ev_data, ev_splits
    try:
        _, data = load_sequences(cfg.data)
    except (DataError, OSError) as exc:
        raise ComparisonError(f"cannot check {who} for leakage into the evaluation: its training data "
                              f"{cfg.data.path} does not load ({exc})") from None
    fingerprint = data.fingerprint()
    if fingerprint != bundle.info.dataset_fingerprint:
        raise ComparisonError(
            f"cannot check {who} for leakage into the evaluation: its training data {cfg.data.path} has changed "
            f"since (fingerprint {fingerprint}, trained on {bundle.info.dataset_fingerprint})")
    return data, split_of(cfg, data)


def _seen(data: SequenceData, splits: Splits, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per (user, item) pair (catalog rows of ``data``; -1 = not there): how often a model trained on
    ``splits`` saw the user take the item (training sequence + valid target). Vectorised."""
    out = np.zeros(len(users), dtype=np.int64)
    ok = np.flatnonzero((users >= 0) & (items >= 0))
    if len(ok) == 0:
        return out
    train = splits.train.take(users[ok])
    hit = train.values == items[ok][train.row_of_values()]
    out[ok] = np.bincount(train.row_of_values()[hit], minlength=len(ok))
    valid_target = np.full(len(data.user_ids), -1, dtype=np.int64)
    valid_target[splits.valid.users] = splits.valid.targets
    out[ok] += valid_target[users[ok]] == items[ok]
    return out


def leaked_users(ev: EvalSplit, ev_data: SequenceData, ev_splits: Splits, data: SequenceData,
                  splits: Splits) -> int:
    """Evaluation users whose target the model trained on ``splits`` saw more often than the evaluation allows."""
    if data is ev_data:
        return 0
    users = np.asarray(ev.users, dtype=np.int64)
    targets = np.asarray(ev.targets, dtype=np.int64)
    other = pd.Index(data.user_ids).get_indexer(ev_data.user_ids[users])
    item = pd.Index(data.item_ids).get_indexer(ev_data.item_ids[targets])
    mine = _seen(ev_data, ev_splits, users, targets)
    theirs = _seen(data, splits, other, item)
    return int(np.count_nonzero(theirs > mine))


def top_k_rows(users: np.ndarray, items: np.ndarray, k: int, chunk: int = 4096,
               histories: Sequence[np.ndarray] | None = None, history_penalty: float = 0.0) -> np.ndarray:
    """Rows of the k best-scoring items per user (exact, unordered); with ``history_penalty`` each user's
    ``histories`` items (item rows) scored that much lower first, as the served score does."""
    k = min(k, len(items))
    out = []
    for s in range(0, len(users), chunk):
        scores = users[s:s + chunk] @ items.T
        if history_penalty:  # (a repeated index is lowered once)
            own = [np.asarray(h, dtype=np.int64) for h in histories[s:s + chunk]]
            rows = np.repeat(np.arange(len(own)), [len(h) for h in own])
            scores[rows, np.concatenate(own) if own else rows] -= history_penalty
        out.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
    return np.concatenate(out)




def check_no_leak(bundle: Bundle, cfg: Config, who: str, ev_cfg: Config, ev_data: SequenceData, ev_splits: Splits,
                  ev: EvalSplit, ev_name: str, ev_fingerprint: str) -> None:
    """Refuse (``ComparisonError`` naming the model and both datasets) a model trained on evaluation targets."""
    trained, trained_splits = training_data(bundle, cfg, who, ev_cfg, ev_data, ev_splits, ev_fingerprint)
    leaked = leaked_users(ev, ev_data, ev_splits, trained, trained_splits)
    if leaked:
        raise ComparisonError(
            f"{who} was trained on the evaluation targets of {leaked} of {len(ev)} users: its training data "
            f"{cfg.data.path} (fingerprint {bundle.info.dataset_fingerprint}) holds interactions that "
            f"{ev_name} holds out; evaluate on data newer than both models' training data (--data)")


def common_catalog_ranks(bundles: dict[str, Bundle], ev: EvalSplit, ev_data: SequenceData, k: int,
                         exclude_history: bool, eval_cfg: EvalConfig, ev_name: str):
    """Each model's target ranks and top-k rows over the catalog every bundle and the evaluation data
    hold, on the users both can score (the module docstring's rules). Returns (ranks, top, counts)."""
    ids = [str(i) for i in ev_data.item_ids]
    common = [i for i in ids if all(i in b.id_to_row for b in bundles.values())]
    column = {item: c for c, item in enumerate(common)}
    histories = [[ids[i] for i in h] for h in ev.histories]
    targets = [ids[t] for t in ev.targets]
    keep = np.array([t in column for t in targets], dtype=bool)
    counts = {"users_eval": len(ev), "catalog_eval": len(ids), "catalog_common": len(common)}
    vectors = {}
    for m, bundle in bundles.items():
        counts[f"catalog_{m}"] = len(bundle.item_ids)
        counts[f"users_dropped_target_{m}"] = sum(t not in bundle.id_to_row for t in targets)
        vectors[m], unknown = bundle.user_vectors(histories, bundle.info.max_history)
        has_vector = ~np.isnan(vectors[m]).any(1)
        counts[f"users_dropped_no_history_{m}"] = int((keep & ~has_vector).sum())
        counts[f"users_partial_history_{m}"] = sum(bool(u) for u, v in zip(unknown, has_vector) if v)
        keep &= has_vector
    if not keep.any():
        raise ComparisonError(f"no user of {ev_name} can be scored by both models: {counts}")
    rows = np.flatnonzero(keep)
    cols = np.array([column[targets[r]] for r in rows])
    common_histories = [np.array([column[x] for x in histories[r] if x in column], dtype=np.int64) for r in rows]
    ranks, top = {}, {}
    for m, bundle in bundles.items():
        items = bundle.item_embeddings[[bundle.id_to_row[i] for i in common]]
        users = vectors[m][rows]
        penalty = bundle.mix.history_weight  # the served score's history penalty (0: none)
        ranks[m] = target_ranks(users, items, cols, common_histories, exclude_history=exclude_history,
                                chunk_size=eval_cfg.chunk_size, item_block=eval_cfg.item_block,
                                history_penalty=penalty)
        top[m] = top_k_rows(users, items, k, histories=common_histories, history_penalty=penalty)
    counts["users_scored"] = len(rows)
    return ranks, top, counts
