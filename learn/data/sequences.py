"""Per-user chronological sequences over a fixed item catalog, and the two splits.

leave_one_out  per user: last item = test target, second to last = valid target, the rest trains.
time_cut       one global time point T: training sees only interactions before T; each user with
               items on both sides is evaluated on the first item at/after T from its history
               before T; those users are split half/half (seeded) into valid and test.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from learn.data.schema import DataError, DropReport, RawDataset


@dataclass
class EvalSplit:
    users: np.ndarray  # user index per row
    # catalog indices, oldest first, the WHOLE history: the towers read its last data.max_history
    # items, while history exclusion in evaluation removes every earlier item
    histories: list[np.ndarray]
    targets: np.ndarray  # catalog index per row

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Splits:
    kind: str
    train: list[np.ndarray]  # per user (index = user index): training sequence, oldest first
    valid: EvalSplit
    test: EvalSplit
    info: dict[str, int] = field(default_factory=dict)

    def train_popularity(self, num_items: int) -> np.ndarray:
        """How often each catalog item occurs in the training sequences (0 = cold)."""
        if not self.train:
            return np.zeros(num_items, dtype=np.int64)
        flat = np.concatenate([s for s in self.train if len(s)] or [np.zeros(0, np.int64)])
        return np.bincount(flat, minlength=num_items).astype(np.int64)


@dataclass
class SequenceData:
    name: str
    item_ids: np.ndarray  # catalog index -> item id (str)
    texts: list[str]  # catalog index -> text the encoder reads
    user_ids: np.ndarray  # user index -> user id
    seqs: list[np.ndarray]  # user index -> catalog indices, chronological
    times: list[np.ndarray]  # user index -> timestamps (int64, or float64 sub-second seconds), same order
    drops: DropReport

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.seqs))

    def fingerprint(self) -> str:
        """A digest of what a model trained on this data saw: item ids and texts, and every user's
        item sequence."""
        h = hashlib.sha256()
        for item_id, text in zip(self.item_ids, self.texts):
            h.update(f"{item_id}\t{text}\n".encode())
        for seq in self.seqs:
            h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]

    def split(self, kind: str, time_cut: float = 0.8, seed: int = 0) -> Splits:
        if kind == "leave_one_out":
            splits = leave_one_out(self)
        elif kind == "time_cut":
            splits = time_cut_split(self, time_cut, seed)
        else:
            raise DataError(f"unknown split '{kind}' (expected leave_one_out or time_cut)")
        if len(splits.valid) == 0 or len(splits.test) == 0:
            raise DataError(
                f"{self.name}: split {kind} leaves {len(splits.valid)} valid and {len(splits.test)} test users "
                f"(leave_one_out needs users with >= 3 items; time_cut needs users on both sides of the cut)"
            )
        if not any(len(s) >= 2 for s in splits.train):
            raise DataError(f"{self.name}: split {kind} leaves no user with >= 2 training items: nothing to train on")
        return splits


def build_sequences(ds: RawDataset, texts: pd.Series, unsorted: str = "sort") -> SequenceData:
    """Group interactions by user in time order (stable: ties keep file order).

    ``unsorted="fail"``: a user whose timestamps go backwards in file order is an error naming the
    row (for logs that must be append-only); ``"sort"`` orders them by time and counts those rows
    as ``reordered_timestamps`` in ``ds.drops`` (reported and logged, nothing is dropped).
    """
    items = ds.items
    if len(items) == 0:
        raise DataError(f"{ds.source or ds.name}: the items table is empty")
    if len(ds.interactions) == 0:
        raise DataError(f"{ds.source or ds.name}: there are no interactions (after dropping: {ds.drops.summary()})")
    item_ids = items["item_id"].astype(str).to_numpy(dtype=object)
    index = pd.Index(item_ids)
    if not index.is_unique:
        dup = index[index.duplicated()][:5].tolist()
        raise DataError(f"{ds.source or ds.name}: duplicate item ids in the items table: {dup}")
    inter = ds.interactions.reset_index(drop=True)
    codes = index.get_indexer(inter["item_id"].astype(str))
    if (codes < 0).any():
        bad = inter.loc[codes < 0, "item_id"].astype(str).unique()[:5].tolist()
        raise DataError(
            f"{ds.source or ds.name}: {(codes < 0).sum()} interactions name items missing from the "
            f"items table (e.g. {bad}); readers must apply the missing-text policy first"
        )
    ts = inter["timestamp"]
    if ts.isna().any():
        row = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise DataError(f"{ds.source or ds.name}: interaction row {row} has no timestamp")
    ts = ts.astype(np.float64 if pd.api.types.is_float_dtype(ts) else np.int64)  # floats keep sub-second order
    frame = pd.DataFrame({"user": inter["user_id"].astype(str), "item": codes, "ts": ts, "row": np.arange(len(inter))})
    by_user = frame.sort_values(["user", "row"], kind="stable")
    back = (by_user["user"].to_numpy()[1:] == by_user["user"].to_numpy()[:-1]) & (
        np.diff(by_user["ts"].to_numpy()) < 0)
    if unsorted == "fail" and back.any():
        r = by_user.iloc[int(np.flatnonzero(back)[0]) + 1]
        raise DataError(
            f"{ds.source or ds.name}: interaction row {int(r['row'])} (user {r['user']!r}) has timestamp "
            f"{r['ts']}, earlier than that user's previous row; the log must be in time order "
            f"(or set data.unsorted_timestamps=sort)"
        )
    ds.drops.set_changed("reordered_timestamps", int(back.sum()))
    frame = frame.sort_values(["user", "ts", "row"], kind="stable")
    user_ids, starts = np.unique(frame["user"].to_numpy(dtype=object), return_index=True)
    bounds = list(starts) + [len(frame)]
    item_col = frame["item"].to_numpy(np.int64)
    ts_col = frame["ts"].to_numpy()
    seqs = [item_col[bounds[i] : bounds[i + 1]] for i in range(len(user_ids))]
    times = [ts_col[bounds[i] : bounds[i + 1]] for i in range(len(user_ids))]
    return SequenceData(
        name=ds.name,
        item_ids=item_ids,
        texts=texts.astype(str).tolist(),
        user_ids=user_ids,
        seqs=seqs,
        times=times,
        drops=ds.drops,
    )


def leave_one_out(data: SequenceData) -> Splits:
    train, vu, vh, vt, tu, th, tt = [], [], [], [], [], [], []
    too_short = 0
    for u, seq in enumerate(data.seqs):
        if len(seq) < 3:
            # cannot hold out two items: the whole sequence trains, the user is not evaluated
            train.append(seq)
            too_short += 1
            continue
        train.append(seq[:-2])
        vu.append(u)
        vh.append(seq[:-2])
        vt.append(seq[-2])
        tu.append(u)
        th.append(seq[:-1])
        tt.append(seq[-1])
    return Splits(
        kind="leave_one_out",
        train=train,
        valid=EvalSplit(np.asarray(vu, np.int64), vh, np.asarray(vt, np.int64)),
        test=EvalSplit(np.asarray(tu, np.int64), th, np.asarray(tt, np.int64)),
        info={"users_not_evaluated_short": too_short},
    )


def time_cut_split(data: SequenceData, cut: float, seed: int) -> Splits:
    all_ts = np.concatenate(data.times)
    if cut <= 1.0:
        point = float(np.quantile(all_ts, cut))
    else:
        point = float(cut)
    train, users, hist, targ = [], [], [], []
    for u, (seq, ts) in enumerate(zip(data.seqs, data.times)):
        before = ts < point
        train.append(seq[before])
        if before.any() and (~before).any():
            users.append(u)
            hist.append(seq[before])
            targ.append(seq[~before][0])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(users))
    half = len(order) // 2
    pick = lambda idx: EvalSplit(  # noqa: E731
        np.asarray([users[i] for i in idx], np.int64),
        [hist[i] for i in idx],
        np.asarray([targ[i] for i in idx], np.int64),
    )
    return Splits(
        kind="time_cut",
        train=train,
        valid=pick(sorted(order[:half])),
        test=pick(sorted(order[half:])),
        info={"time_cut": int(point), "users_evaluated": len(users)},
    )
