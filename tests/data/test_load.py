import pandas as pd
import pytest

from learn.config import DataConfig
from learn.data.load import detect_format, item_texts, load_dataset
from learn.data.schema import DataError, RawDataset


def test_detects_generic_files_and_reads_them(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title,brand\na,Alpha,X\nb,Beta,Y\n")
    (tmp_path / "interactions.jsonl").write_text('{"user_id": "u", "item_id": "a", "timestamp": 1}\n')
    cfg = DataConfig(path=str(tmp_path))
    assert detect_format(cfg) == "files"
    ds = load_dataset(cfg)
    assert list(item_texts(ds, "{title} by {brand}")) == ["Alpha by X", "Beta by Y"]


def test_detects_unisrec_and_demo(tmp_path):
    (tmp_path / "Toy.item2index").write_text("A\t0\n")
    assert detect_format(DataConfig(path=str(tmp_path))) == "unisrec"
    assert detect_format(DataConfig(path="demo")) == "demo"


def test_unknown_directory_and_missing_path_are_clear(tmp_path):
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(DataConfig(path=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist"):
        detect_format(DataConfig(path=str(tmp_path / "nope")))


def test_empty_rendered_text_names_the_items():
    ds = RawDataset("t", pd.DataFrame({"item_id": ["a", "b"], "title": ["x", ""]}),
                    pd.DataFrame(columns=["user_id", "item_id", "timestamp"]))
    with pytest.raises(DataError, match=r"1 items render to an empty text.*\['b'\]"):
        item_texts(ds, "{title}")
