from pathlib import Path

import pytest

from learn.config import ConfigError, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(ROOT / "conf" / name)
    assert cfg.eval.ks


def test_overrides_set_typed_values():
    cfg = load_config(ROOT / "conf/default.yaml", ["seed=7", "train.lr=1e-4", "data.path=some/dir",
                                                   "eval.exclude_history=true", "eval.ks=[5,20]"])
    assert cfg.seed == 7 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.path == "some/dir" and cfg.eval.exclude_history is True and cfg.eval.ks == [5, 20]
    flat = flatten(cfg)
    assert flat["train.lr"] == pytest.approx(1e-4) and flat["eval.exclude_history"] is True


@pytest.mark.parametrize(
    "override, needle",
    [
        ("trian.lr=1", "unknown key 'trian'"),
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("train.lr=fast", "key 'train.lr' expects a number"),
        ("seed=1.5", "key 'seed' expects an integer"),
        ("eval.exclude_history=maybe", "key 'eval.exclude_history' expects true/false"),
        ("model.item_tower=z", "key 'model.item_tower' must be one of"),
        ("model.n_heads=3", "divisible"),
        ("novalue", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ROOT / "conf/default.yaml", [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'train\.lerning_rate'"):
        load_config(bad)
    bad.write_text("data:\n  max_history: forty\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'data\.max_history' expects an integer"):
        load_config(bad)
