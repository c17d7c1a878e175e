"""Per-user chronological sequences over a fixed item catalog, and the two splits.

leave_one_out  per user: last item = test target, second to last = valid target, the rest trains.
time_cut       one global time point T: training sees only interactions before T; each user with
               items on both sides is evaluated on the first item at/after T from its history
               before T; those users are split half/half (seeded) into valid and test.

Sequences are CSR (``learn.data.ragged.Ragged``): int32 catalog codes in one flat array plus
per-user offsets, built and split with numpy only (no Python object per interaction).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from learn.data.ragged import Ragged
from learn.data.schema import DataError, DropReport, RawDataset

CODE_DTYPE = np.int32  # catalog codes; 2^31 items is far beyond any catalog this runs on


def _ragged(x) -> Ragged:
    return x if isinstance(x, Ragged) else Ragged.from_arrays(list(x))


@dataclass
class EvalSplit:
    users: np.ndarray  # user index per row
    # catalog indices, oldest first, the WHOLE history: the towers read its last data.max_history
    # items, while history exclusion in evaluation removes every earlier item
    histories: Ragged
    targets: np.ndarray  # catalog index per row

    def __post_init__(self) -> None:
        self.histories = _ragged(self.histories)
        self.users = np.asarray(self.users)
        self.targets = np.asarray(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> "EvalSplit":
        rows = np.asarray(rows, dtype=np.int64)
        return EvalSplit(self.users[rows], self.histories.take(rows), self.targets[rows])


@dataclass
class Splits:
    kind: str
    train: Ragged  # per user (index = user index): training sequence, oldest first
    valid: EvalSplit
    test: EvalSplit
    info: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = _ragged(self.train)

    def train_popularity(self, num_items: int) -> np.ndarray:
        """How often each catalog item occurs in the training sequences (0 = cold)."""
        return np.bincount(self.train.values, minlength=num_items).astype(np.int64)


@dataclass
class SequenceData:
    name: str
    item_ids: np.ndarray  # catalog index -> item id (str)
    texts: list[str]  # catalog index -> text the encoder reads
    user_ids: np.ndarray  # user index -> user id
    seqs: Ragged  # user index -> catalog indices, chronological
    times: Ragged | None  # user index -> timestamps (int64, or float64 sub-second seconds), same order;
    # None once released (``release_times``: only the split reads them)
    drops: DropReport

    def __post_init__(self) -> None:
        self.seqs = _ragged(self.seqs)
        if self.times is not None and not isinstance(self.times, Ragged):
            arrays = list(self.times)
            dtype = np.float64 if any(np.asarray(t).dtype.kind == "f" for t in arrays) else np.int64
            self.times = Ragged.from_arrays(arrays, dtype=dtype)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.seqs.values)

    def fingerprint(self) -> str:
        """A digest of what a model trained on this data saw: item ids and texts, and every user's
        item sequence (each as int64 bytes followed by b"|", the digest of the list-based layout)."""
        h = hashlib.sha256()
        for item_id, text in zip(self.item_ids, self.texts):
            h.update(f"{item_id}\t{text}\n".encode())
        seqs = self.seqs
        step = 1 << 18  # users per chunk: bounded memory at any size
        for lo in range(0, len(seqs), step):
            hi = min(lo + step, len(seqs))
            base = seqs.offsets[lo]
            vals = seqs.values[base: seqs.offsets[hi]].astype("<i8")
            n = hi - lo
            buf = np.empty(8 * len(vals) + n, dtype=np.uint8)
            ends = (seqs.offsets[lo + 1: hi + 1] - base) * 8 + np.arange(n)  # where each b"|" goes
            is_sep = np.zeros(len(buf), dtype=bool)
            is_sep[ends] = True
            buf[is_sep] = ord("|")
            buf[~is_sep] = vals.view(np.uint8)
            h.update(buf.tobytes())
        return h.hexdigest()[:16]

    def release_times(self) -> None:
        """Drop the timestamps (8 bytes per interaction) once the split is made: nothing after it reads
        them. A later ``split(kind="time_cut")`` is then an error."""
        self.times = None

    def split(self, kind: str, time_cut: float = 0.8, seed: int = 0) -> Splits:
        if kind == "time_cut" and self.times is None:
            raise RuntimeError(f"{self.name}: the timestamps were released; time_cut needs them")
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
        if not (splits.train.lengths() >= 2).any():
            raise DataError(f"{self.name}: split {kind} leaves no user with >= 2 training items: nothing to train on")
        return splits


def _codes_of(column: pd.Series, index: pd.Index) -> np.ndarray:
    """An id column -> positions in ``index`` (-1 where absent), via its categories when it has them
    (one lookup per distinct id, not per row)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        cats = index.get_indexer(column.cat.categories.astype(str))
        codes = column.cat.codes.to_numpy()
        return np.where(codes >= 0, cats.astype(CODE_DTYPE)[np.maximum(codes, 0)], -1).astype(CODE_DTYPE)
    return index.get_indexer(column.astype(str)).astype(CODE_DTYPE)


def _user_codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, sorted unique user ids)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        cats = column.cat.categories.astype(str).to_numpy(dtype=object)
        order = np.argsort(cats, kind="stable")
        rank = np.empty(len(cats), dtype=np.int64)
        rank[order] = np.arange(len(cats))
        codes = column.cat.codes.to_numpy()
        if (codes < 0).any():
            raise DataError(f"interaction row {int(np.flatnonzero(codes < 0)[0])} has no user id")
        used = np.zeros(len(cats), dtype=bool)
        used[codes] = True
        # categories no row uses are left out (a user id exists only through its rows)
        keep_rank = (np.cumsum(used[order]) - 1).astype(CODE_DTYPE)
        return keep_rank[rank[codes]], cats[order][used[order]]
    codes, uniques = pd.factorize(column.astype(str), sort=True)
    return codes.astype(CODE_DTYPE), np.asarray(uniques, dtype=object)


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
    inter = ds.interactions
    codes = _codes_of(inter["item_id"], index)
    if (codes < 0).any():
        bad_rows = np.flatnonzero(codes < 0)
        bad = pd.unique(inter["item_id"].iloc[bad_rows[:1000]].astype(str))[:5].tolist()
        raise DataError(
            f"{ds.source or ds.name}: {len(bad_rows)} interactions name items missing from the "
            f"items table (e.g. {bad}); readers must apply the missing-text policy first"
        )
    ts = inter["timestamp"]
    if ts.isna().any():
        row = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise DataError(f"{ds.source or ds.name}: interaction row {row} has no timestamp")
    ts = ts.to_numpy(np.float64 if pd.api.types.is_float_dtype(ts) else np.int64)  # floats keep sub-second order
    user, user_ids = _user_codes(inter["user_id"])
    by_user = np.argsort(user, kind="stable")  # users in id order, each in file order
    n_back, first_back = 0, None
    step = 1 << 22  # compared a slice at a time: no full-size sorted copies of users and times
    for lo in range(0, max(len(by_user) - 1, 0), step):
        idx = by_user[lo: lo + step + 1]
        u, t = user[idx], ts[idx]
        back = (u[1:] == u[:-1]) & (t[1:] < t[:-1])
        n_back += int(back.sum())
        if first_back is None and back.any():
            first_back = int(idx[int(np.flatnonzero(back)[0]) + 1])
    if unsorted == "fail" and first_back is not None:
        row = first_back
        raise DataError(
            f"{ds.source or ds.name}: interaction row {row} (user {user_ids[user[row]]!r}) has timestamp "
            f"{ts[row]}, earlier than that user's previous row; the log must be in time order "
            f"(or set data.unsorted_timestamps=sort)"
        )
    ds.drops.set_changed("reordered_timestamps", n_back)
    if n_back:
        del by_user
        order = np.lexsort((ts, user))  # by user, then time; ties keep file order (lexsort is stable)
    else:  # every user already in time order in the file: the stable sort by user is that order
        order = by_user
    lengths = np.bincount(user, minlength=len(user_ids))
    del user
    seqs = Ragged.from_lengths(codes[order], lengths)
    del codes
    times = Ragged(ts[order], seqs.offsets)
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
    seqs = data.seqs
    n = seqs.lengths()
    short = n < 3  # cannot hold out two items: the whole sequence trains, the user is not evaluated
    train = seqs.slice_each(0, np.where(short, n, n - 2))
    users = np.flatnonzero(~short)
    ev = seqs if len(users) == len(seqs) else seqs.take(users)  # no copy when every user is evaluated
    return Splits(
        kind="leave_one_out",
        train=train,
        valid=EvalSplit(users, ev.slice_each(0, -2), ev.last(2).astype(np.int64)),
        test=EvalSplit(users.copy(), ev.slice_each(0, -1), ev.last(1).astype(np.int64)),
        info={"users_not_evaluated_short": int(short.sum())},
    )


def time_cut_split(data: SequenceData, cut: float, seed: int) -> Splits:
    seqs, times = data.seqs, data.times
    all_ts = times.values
    point = float(np.quantile(all_ts, cut)) if cut <= 1.0 else float(cut)
    before = all_ts < point
    row = seqs.row_of_values()
    n = seqs.lengths()
    n_before = np.bincount(row, weights=before, minlength=len(seqs)).astype(np.int64)
    train = Ragged.from_lengths(seqs.values[before], n_before)
    users = np.flatnonzero((n_before > 0) & (n_before < n))
    # the first item at/after the cut of each evaluated user (times may be unsorted within a user)
    pos = np.where(~before, np.arange(len(all_ts)), len(all_ts))
    first_after = np.full(len(seqs), len(all_ts), dtype=np.int64)
    np.minimum.at(first_after, row, pos)
    hist = train.take(users)
    targ = seqs.values[first_after[users]].astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(users))
    half = len(order) // 2

    def pick(idx: np.ndarray) -> EvalSplit:
        idx = np.sort(idx).astype(np.int64)
        return EvalSplit(users[idx], hist.take(idx), targ[idx])

    return Splits(
        kind="time_cut",
        train=train,
        valid=pick(order[:half]),
        test=pick(order[half:]),
        info={"time_cut": int(point), "users_evaluated": len(users)},
    )
