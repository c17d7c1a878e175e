"""bench/quality.py --only keeps the rows of the results file it did not run."""

from bench.quality import ROWS, merge_rows


def test_only_replaces_the_rows_it_ran_and_keeps_the_others():
    previous = [{"name": "floor_last_minilm", "wall_s": 1}, {"name": "learn_freeze_4", "wall_s": 2},
                {"name": "lever_score_mix", "wall_s": 3}]
    new = [{"name": "learn_freeze_4", "wall_s": 20}, {"name": "lever_softmax_seen", "wall_s": 30}]
    merged = merge_rows(previous, new)
    assert [(r["name"], r["wall_s"]) for r in merged] == [
        ("floor_last_minilm", 1), ("learn_freeze_4", 20), ("lever_score_mix", 3), ("lever_softmax_seen", 30)]
    assert merge_rows([], new) == new and merge_rows(previous, []) == previous
    assert {n for n, *_ in ROWS} >= {r["name"] for r in merged}


def test_every_row_loads_as_its_command_would_run_it():
    """A row whose overrides its freeze refuses would fail after minutes of set-up: load each one now."""
    from bench.quality import ROOT, ROWS
    from learn.config import load_config

    for name, _, config, overrides in ROWS:
        cfg = load_config(ROOT / config, ["data.path=demo", *overrides, "train.num_threads=1"])
        assert cfg.train.num_threads == 1, name
