"""MovieLens-100k -> a UniSRec-format directory, for a second real dataset of another shape than
Scientific: movies, 943 users with 20 to 737 ratings each (mean 106), 1,682 items.

    python bench/movielens.py                      # source: RecBole's copy in .venv-recbole (make recbole-env)
    python bench/movielens.py --source DIR --out .cache/learn/data/movielens-100k
    python bench/movielens.py --last 10 --out .cache/learn/data/movielens-100k-last10   # shorter sequences

The source is RecBole's atomic-file copy of MovieLens-100k, shipped inside the ``recbole`` PyPI package
(``recbole/dataset_example/ml-100k``: ``ml-100k.inter`` with user, item, rating, timestamp and
``ml-100k.item`` with title, release year, genres). Nothing is downloaded and nothing is written into
the repository: the output goes under ``.cache/`` (ignored by git). Every rating counts as an
interaction (as RecBole's SASRec benchmarks on ml-100k do). Each user's ratings are ordered by
timestamp, ties kept in file order (a stable sort, as RecBole orders them); leave-one-out then gives
the test row (last item), the valid row (second to last) and one train row per earlier position, each
history cut to its last 50 items, as UniSRec's files are. An item's text is
``"<title> (<year>). Genres: <g1>, <g2>."`` (the year left out where the file has none).

The files are named after the output directory (``movielens-100k.train.inter``, ...): RecBole takes a
dataset called ``ml-100k`` to be its own bundled copy and would not read ours.
Both ``flows/full_pipeline.py data.path=<out>`` and ``bench/sasrec_recbole.py --data <out>`` read the
result, so learn and the SASRec peer train and score on the same rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.data.files import decode_utf8  # noqa: E402
from learn.data.schema import DataError  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402

INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]
MAX_HISTORY = 50  # UniSRec's files keep the last 50 items of each history


def default_source() -> Path | None:
    hits = sorted(ROOT.glob(".venv-recbole/lib/python3*/site-packages/recbole/dataset_example/ml-100k"))
    return hits[0] if hits else None


def _rows(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every data line; the header and the field count are checked."""
    lines = decode_utf8(path.read_bytes(), path).splitlines()  # bad bytes: named by line, as learn's readers do
    if not lines or lines[0].split("\t") != header:
        got = lines[0].split("\t") if lines else "an empty file"
        raise DataError(f"{path}: line 1: expected the header {header}, got {got}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}: line {n}: expected {len(header)} tab-separated fields "
                            f"({', '.join(header)}), got {len(fields)}")
        out.append((n, fields))
    return out


def read_ratings(path: Path) -> dict[str, list[str]]:
    """user token -> item tokens ordered by timestamp (ties in file order)."""
    events: dict[str, list[tuple[float, int, str]]] = {}
    for n, (user, item, _rating, ts) in _rows(path, INTER_HEADER):
        try:
            stamp = float(ts)
        except ValueError:
            raise DataError(f"{path}: line {n}: timestamp {ts!r} is not a number") from None
        if not user or not item:
            raise DataError(f"{path}: line {n}: empty user_id or item_id")
        events.setdefault(user, []).append((stamp, n, item))
    return {u: [item for _, _, item in sorted(ev)] for u, ev in events.items()}


def read_texts(path: Path) -> dict[str, str]:
    texts = {}
    for n, (item, title, year, genres) in _rows(path, ITEM_HEADER):
        if not title.strip():
            raise DataError(f"{path}: line {n}: item {item!r} has an empty movie_title")
        if item in texts:
            raise DataError(f"{path}: line {n}: item {item!r} appears twice")
        head = f"{title.strip()} ({year.strip()})" if year.strip() else title.strip()
        kinds = ", ".join(genres.split())
        texts[item] = f"{head}. Genres: {kinds}." if kinds else f"{head}."
    return texts


def convert(source: Path, out: Path, source_name: str = "ml-100k", last: int | None = None) -> dict[str, int]:
    """Write the UniSRec directory ``out`` (its files named after it); returns its counts. ``last`` keeps
    each user's last ``last`` ratings only (the same users with shorter sequences; the catalog is then the
    items those ratings name)."""
    if last is not None and last < 3:
        raise ValueError(f"--last must be >= 3 (leave-one-out needs 3 ratings per user), got {last}")
    sequences = read_ratings(source / f"{source_name}.inter")
    if last is not None:
        sequences = {u: seq[-last:] for u, seq in sequences.items()}
    texts = read_texts(source / f"{source_name}.item")
    name = out.name
    unknown = sorted({i for seq in sequences.values() for i in seq} - texts.keys())
    if unknown:
        raise DataError(f"{source / (source_name + '.inter')}: {len(unknown)} rated items have no row in "
                        f"{source_name}.item (e.g. {unknown[:5]})")
    short = sorted(u for u, seq in sequences.items() if len(seq) < 3)
    if short:
        raise DataError(f"{source / (source_name + '.inter')}: {len(short)} users have fewer than 3 ratings "
                        f"(leave-one-out needs 3; e.g. {short[:5]})")
    items = sorted({i for seq in sequences.values() for i in seq}, key=lambda t: (len(t), t))
    index = {tok: k for k, tok in enumerate(items)}
    users = sorted(sequences, key=lambda t: (len(t), t))
    split_rows: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for u, user in enumerate(users):
        seq = [index[i] for i in sequences[user]]
        n = len(seq)
        for p in range(1, n):
            which = "test" if p == n - 1 else "valid" if p == n - 2 else "train"
            hist = " ".join(map(str, seq[max(0, p - MAX_HISTORY):p]))
            split_rows[which].append(f"{u}\t{hist}\t{seq[p]}")
    out.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    for which, rows in split_rows.items():
        atomic_write_text(out / f"{name}.{which}.inter", header + "\n".join(rows) + "\n")
    atomic_write_text(out / f"{name}.text",
                      "item_id:token\ttext:token_seq\n" + "".join(f"{i}\t{texts[i]}\n" for i in items))
    atomic_write_text(out / f"{name}.item2index", "".join(f"{i}\t{k}\n" for i, k in index.items()))
    atomic_write_text(out / f"{name}.user2index", "".join(f"{t}\t{k}\n" for k, t in enumerate(users)))
    lengths = np.array([len(s) for s in sequences.values()])
    counts = {"users": len(users), "items": len(items), "interactions": int(lengths.sum()),
              "train_rows": len(split_rows["train"]), "mean_sequence": round(float(lengths.mean()), 2),
              "max_sequence": int(lengths.max())}
    kept = f"; only each user's last {last} ratings kept" if last else ""
    atomic_write_text(out / "PROVENANCE.md", (
        f"# MovieLens-100k in UniSRec format (generated by bench/movielens.py; not in the repository)\n\n"
        f"Source: {source} (RecBole's atomic files of GroupLens' MovieLens-100k, shipped in the recbole PyPI "
        f"package). Every rating is an interaction; each user's ratings in timestamp order (ties in file "
        f"order){kept}; leave-one-out; histories cut "
        f"to the last {MAX_HISTORY} items.\n\n"
        f"Counts: {counts}\n"))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=None,
                    help="directory with ml-100k.inter and ml-100k.item (default: RecBole's copy in .venv-recbole)")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache/learn/data/movielens-100k")
    ap.add_argument("--last", type=int, default=None,
                    help="keep each user's last N ratings only: the same users with shorter sequences (e.g. "
                         "--last 10 --out .cache/learn/data/movielens-100k-last10)")
    args = ap.parse_args()
    source = args.source or default_source()
    if source is None:
        print("no --source given and no RecBole copy of ml-100k in .venv-recbole: run `make recbole-env` first",
              file=sys.stderr)
        return 2
    counts = convert(source, args.out, last=args.last)
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
