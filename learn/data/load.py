"""``data.path`` + ``data.format`` -> a RawDataset, and the texts the encoder reads.

format=auto looks at the path:  "demo" -> generated demo data; a directory with ``*.item2index``
-> UniSRec files; with ``meta_*.json.gz`` -> raw Amazon 2018; with ``items.*`` and
``interactions.*`` (parquet, csv, jsonl) -> generic files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from learn.config import DataConfig
from learn.data.schema import DataError, RawDataset, render_texts
from learn.data.sequences import SequenceData, build_sequences

_GENERIC_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


def _find_generic(directory: Path, stem: str) -> Path | None:
    hits = [directory / f"{stem}{s}" for s in _GENERIC_SUFFIXES if (directory / f"{stem}{s}").is_file()]
    if len(hits) > 1:
        raise DataError(f"{directory}: several '{stem}' files found ({[h.name for h in hits]}); keep one")
    return hits[0] if hits else None


def detect_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.path == "demo":
        return "demo"
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"data.path '{cfg.path}' does not exist (give a dataset directory, or 'demo')")
    if cfg.items_file or cfg.interactions_file:
        return "files"
    if path.is_dir():
        if list(path.glob("*.item2index")):
            return "unisrec"
        if list(path.glob("meta_*.json.gz")):
            return "amazon2018"
        if _find_generic(path, "items") and _find_generic(path, "interactions"):
            return "files"
    raise DataError(
        f"data.path '{cfg.path}': cannot tell the format (expected a UniSRec directory with *.item2index, "
        f"raw Amazon 2018 files meta_<Category>.json.gz, or items.* + interactions.*); set data.format"
    )


def load_dataset(cfg: DataConfig) -> RawDataset:
    fmt = detect_format(cfg)
    if fmt == "demo":
        from learn.data.demo import generate_demo

        return generate_demo(cfg.demo)
    path = Path(cfg.path)
    if fmt == "unisrec":
        from learn.data.unisrec import read_unisrec

        return read_unisrec(path)
    if fmt == "amazon2018":
        from learn.data.amazon import read_amazon2018

        category = cfg.category
        if category is None:
            metas = sorted(path.glob("meta_*.json.gz"))
            if len(metas) != 1:
                raise DataError(f"{path}: found {len(metas)} meta_*.json.gz files; set data.category")
            category = metas[0].name[len("meta_") : -len(".json.gz")]
        return read_amazon2018(path, category, min_core=cfg.min_core, missing_text=cfg.missing_text)
    if fmt == "files":
        from learn.data.files import read_files

        items = Path(cfg.items_file) if cfg.items_file else _find_generic(path, "items")
        inter = Path(cfg.interactions_file) if cfg.interactions_file else _find_generic(path, "interactions")
        if items is None or inter is None:
            raise DataError(f"data.format=files: set data.items_file and data.interactions_file (path: {path})")
        if path.is_dir():
            items = items if items.is_absolute() or items.exists() else path / items
            inter = inter if inter.is_absolute() or inter.exists() else path / inter
        return read_files(
            items, inter, item_id_col=cfg.item_id_col, user_id_col=cfg.user_id_col,
            timestamp_col=cfg.timestamp_col, text_fields=cfg.text_fields or None,
            missing_text=cfg.missing_text, name=path.name if path.is_dir() else None,
        )
    raise DataError(f"data.format '{fmt}' is not supported")


def item_texts(ds: RawDataset, template: str | None) -> pd.Series:
    """The text each catalog item is embedded from; an empty rendered text is an error."""
    tpl = template or ds.default_template
    texts = render_texts(ds.items, tpl, source=ds.source or ds.name)
    empty = texts.str.len() == 0
    if empty.any():
        bad = ds.items.loc[empty, "item_id"].astype(str).tolist()[:5]
        raise DataError(f"{ds.source or ds.name}: {int(empty.sum())} items render to an empty text with "
                        f"template {tpl!r} (e.g. {bad})")
    return texts


def load_sequences(cfg: DataConfig) -> tuple[RawDataset, SequenceData]:
    """The configured dataset read, its item texts built from the template, and the per-user
    sequences: where every flow and bench starts. The returned RawDataset's interactions table is
    empty (released once the sequences are built)."""
    raw = load_dataset(cfg)
    data = build_sequences(raw, item_texts(raw, cfg.text_template), cfg.unsorted_timestamps)
    # the sequences hold every kept row: the interactions table is released (at 20M rows it is
    # most of the memory a run would otherwise hold); the items table, drops and source stay
    raw.interactions = raw.interactions.iloc[:0].copy()  # a copy: a slice would keep the 20M-row arrays alive
    return raw, data
