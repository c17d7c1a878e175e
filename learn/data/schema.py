"""The one internal representation every reader produces.

A ``RawDataset`` is two tables:
  items         item_id (str, unique, non-empty) + text fields (str); ``text`` is the rendered
                text the encoder reads (see ``render_texts``)
  interactions  user_id (str), item_id (str), timestamp (int64 seconds, or float64 where the source
                has sub-second times; an ordinal where the source has no clock, e.g. UniSRec files)
plus a ``DropReport`` that counts every row a reader removed, by reason, and every row kept but
changed (e.g. put back into time order).

A text value that is empty, whitespace or one of the literals in ``MISSING_TEXT`` ("NaN", "None",
"null", any case; what a dataframe export writes for a missing value) is missing text, never text.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


class DataError(ValueError):
    """Bad input. The message names the file, the line/row or key, and what was expected."""


MISSING_TEXT = frozenset({"nan", "none", "null"})


def is_missing_text(text: str) -> bool:
    """True for an empty or whitespace text and for the literals of ``MISSING_TEXT`` (any case)."""
    return text.strip().lower() in MISSING_TEXT or not text.strip()


@dataclass
class DropReport:
    """Rows removed while reading, by reason. Nothing is removed without a count here.

    ``changed``: rows kept but altered, by kind (e.g. ``reordered_timestamps``: rows whose timestamp
    goes back in time against their user's previous row in file order, put into time order); they
    are reported and logged as metrics under their own names, and not part of ``total``."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int, examples: list[str] | None = None) -> None:
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + int(n)
        if examples:
            kept = self.examples.setdefault(reason, [])
            kept.extend(str(e) for e in examples[: max(0, 5 - len(kept))])

    def set_changed(self, kind: str, n: int) -> None:
        """Record that ``n`` rows were kept but altered (set, not added: rebuilding counts once)."""
        if n > 0:
            self.changed[kind] = int(n)
        else:
            self.changed.pop(kind, None)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def metrics(self) -> dict[str, int]:
        return {**{f"dropped_{k}": v for k, v in sorted(self.counts.items())}, **dict(sorted(self.changed.items()))}

    def summary(self) -> str:
        parts = []
        for reason, n in sorted(self.counts.items()):
            ex = self.examples.get(reason)
            parts.append(f"{reason}: {n}" + (f" (e.g. {', '.join(ex)})" if ex else ""))
        text = "dropped " + "; ".join(parts) if parts else "no rows dropped"
        return "; ".join([text, *(f"{kind}: {n}" for kind, n in sorted(self.changed.items()))])


@dataclass
class RawDataset:
    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    drops: DropReport = field(default_factory=DropReport)
    source: str = ""
    default_template: str = "{text}"
    # False when the source has no clock and timestamps are only an order (UniSRec files, generic
    # files without a timestamp column): a global time cut is then meaningless
    has_clock: bool = True

    def write_parquet(self, directory: str | Path) -> tuple[Path, Path]:
        """items.parquet and interactions.parquet, each written atomically."""
        from learn.utils import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, frame in (("items", self.items), ("interactions", self.interactions)):
            target = directory / f"{name}.parquet"
            with atomic_path(target) as tmp:
                frame.to_parquet(tmp, index=False)
            out.append(target)
        return out[0], out[1]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_texts(items: pd.DataFrame, template: str, source: str = "items") -> pd.Series:
    """One text per item from ``template`` (``str.format`` fields = item columns).

    Missing values render as an empty string; a field the table lacks is a DataError.
    """
    names = template_fields(template)
    missing = [n for n in names if n not in items.columns]
    if missing:
        raise DataError(
            f"{source}: text template {template!r} uses field(s) {missing} that the items table "
            f"lacks (columns: {list(items.columns)})"
        )
    cols = {n: items[n].fillna("").astype(str).tolist() for n in names}
    texts = [template.format(**{n: cols[n][i] for n in names}) for i in range(len(items))]
    return pd.Series(texts, index=items.index, dtype=object).str.strip()
