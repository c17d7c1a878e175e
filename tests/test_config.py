from pathlib import Path

import pytest

from learn.config import ConfigError, config_from_dict, flatten, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")))
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


@pytest.mark.parametrize("overrides, named", [
    (["model.item_tower=b"], ["model.item_tower=b", "train.recipe=full_softmax"]),
    (["train.recipe=in_batch", "model.item_tower=b"], ["model.item_tower=b", "train.recipe=in_batch"]),
    (["train.recipe=dense_all_action", "train.all_positions=true", "train.target_len=8"],
     ["train.all_positions=true", "train.recipe=dense_all_action"]),
    (["train.n_history=3"], ["train.n_history", "train.recipe=dense_all_action"]),
    (["train.recipe=content_last", "model.item_id_embedding=true", "export.enabled=false"],
     ["model.item_id_embedding=true", "train.recipe=content_last"]),
    (["model.positions_min_history=5"], ["model.positions_min_history", "model.positions=auto"]),
])
def test_an_option_without_effect_in_its_combination_is_an_error_naming_both_keys(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "conf/tiny.yaml", overrides)
    for text in named:
        assert text in str(err.value)


def test_effective_combinations_and_saved_configs_load():
    dense = load_config(ROOT / "conf/tiny.yaml", ["train.recipe=dense_all_action", "model.item_tower=b",
                                                  "train.n_history=3", "train.target_len=8"])
    assert dense.model.item_tower == "b" and dense.train.n_history == 3
    # a baseline ignores the towers' settings of the file it runs with
    assert load_config(ROOT / "conf/scientific.yaml", ["train.recipe=content_last"]).train.all_positions
    ids = load_config(ROOT / "conf/scientific/2026-12-07-7-content-id-members.yaml", ["train.recipe=content_last"])
    assert ids.model.item_id_embedding  # from the file: ignored by the floor, not refused (an override is)
    # a saved config holds every key: it loads without the effect checks (they ran when it was made)
    assert config_from_dict(to_dict(dense)).train.n_history == 3


def test_choices_are_checked_once_from_their_literal_types():
    with pytest.raises(ConfigError, match=r"key 'train.recipe' must be one of \['full_softmax'"):
        load_config(ROOT / "conf/tiny.yaml", ["train.recipe=softmax"])
    with pytest.raises(ConfigError, match="key 'embed.backend' must be one of"):
        config_from_dict({"embed": {"backend": "onnx"}})


def test_the_recipe_tables_cover_every_recipe_name():
    import typing

    from learn.config import BaselineName, RecipeName, TrainedRecipe
    from learn.evaluate.baselines import BASELINES
    from learn.train.recipes import RECIPES

    assert set(RECIPES) == set(typing.get_args(TrainedRecipe))
    assert set(BASELINES) == set(typing.get_args(BaselineName))
    assert set(typing.get_args(RecipeName)) == set(RECIPES) | set(BASELINES)


def test_the_scientific_config_is_its_latest_freeze():
    latest = sorted((ROOT / "conf" / "scientific").glob("*.yaml"))[-1]
    assert to_dict(load_config(ROOT / "conf/scientific.yaml")) == to_dict(load_config(latest)), latest.name


@pytest.mark.parametrize("overrides,message", [
    (["train.pretrain_recipe=sampled_softmax"], "no effect unless train.pretrain_epochs > 0"),
    (["train.pretrain_batch_size=64"], "no effect unless train.pretrain_epochs > 0"),
    (["train.pretrain_epochs=-1"], "train.pretrain_epochs"),
    (["train.pretrain_epochs=3", "train.backend=ray"], "train.backend=local only"),
    (["train.pretrain_epochs=3", "train.recipe=dense_all_action"], "trained pair recipe"),
    (["train.epoch_coverage=transitions", "train.all_positions=false"], "unless train.all_positions=true"),
    (["model.positions=auto", "model.positions_min_history=0"], "'model.positions_min_history' must be > 0"),
    (["model.positions=auto", "train.recipe=dense_all_action"], "model.positions=auto with model.item_tower=a"),
])
def test_two_stage_and_coverage_keys_are_refused_where_they_cannot_act(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf/tiny.yaml", overrides)
