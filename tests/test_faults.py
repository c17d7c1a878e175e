"""Faults and abuse a new user hits (issue 15, items 8, 9, 10, 13), on tiny data: each case asserts the
exit code, the message (naming the key / file / row) and that nothing was left behind (no MLflow run,
no content store written). In-process where possible; three subprocesses show what only the outside
sees: the exit code and no traceback on stderr."""

import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from flows.full_pipeline import main as pipeline_main
from learn.cli import main as learn_main, run_flow
from learn.config import ConfigError, load_config
from learn.data.amazon import clean
from learn.data.load import load_sequences
from learn.data.schema import DataError
from learn.embed.models import ModelNotAvailable, resolve_model
from learn.serve.retriever import _refuse_dropped_params, log_retriever
from tests.flows import run_pipeline
from tests.serve.test_retriever import IDS, MAX_HISTORY, served, tracking  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "conf/tiny.yaml")


def outputs(root: Path, model_cache: Path) -> list[str]:
    """Overrides that put every output of a run under ``root``."""
    return [f"output_dir={root / 'runs'}", f"embed.cache_dir={model_cache}", f"embed.store={root / 'content.parquet'}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_location={root / 'artifacts'}",
            "tracking.system_metrics=false"]


def runs_in(root: Path) -> list:
    """Every run in the sqlite store under ``root`` (none when the store was never created)."""
    db = root / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def error_line(err: str) -> str:
    """The flow's one-line error: the last line on stderr (MLflow's own log lines come before it)."""
    return err.strip().splitlines()[-1]


def assert_nothing_written(root: Path) -> None:
    assert runs_in(root) == []
    assert not (root / "content.parquet").exists() and not (root / "content.parquet.d").exists()
    assert not (root / "runs").exists()


# ---- 8: bad config values: exit 2 naming the key, before anything runs --------------------------

@pytest.mark.parametrize("override, needle", [
    ("train.lr=nan", "key 'train.lr' expects a finite number, got 'nan'"),
    ("train.lr=.nan", "key 'train.lr' expects a finite number, got nan"),
    ("train.lr=inf", "key 'train.lr' expects a finite number, got 'inf'"),
    ("train.lr=-.inf", "key 'train.lr' expects a finite number, got -inf"),
    ("embed.flush_seconds=1e400", "key 'embed.flush_seconds' expects a finite number"),
    ("seed=-5", "key 'seed' must be >= 0"),
    ("data.demo.seed=-1", "key 'data.demo.seed' must be >= 0"),
])
def test_bad_value_exits_2_naming_the_key(tmp_path, model_cache, capsys, override, needle):
    rc = pipeline_main(["--config", TINY, *outputs(tmp_path, model_cache), override])
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and err.startswith("config error: ") and needle in err
    assert_nothing_written(tmp_path)


def test_non_finite_float_in_a_file_names_file_and_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  weight_decay: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train.weight_decay' expects a finite number, got inf"):
        load_config(tmp_path / "c.yaml")


def test_unknown_model_names_embed_model_and_what_was_tried(tmp_path, model_cache, capsys, monkeypatch):
    rc = pipeline_main(["--config", TINY, *outputs(tmp_path, model_cache), "--no-progress", "embed.model=nonexistent"])
    err = error_line(capsys.readouterr().err)
    assert rc == 2, err
    assert err.startswith("config error: embed.model 'nonexistent' names no loadable model")
    for tried in ("'minilm', 'smollm2'", "not a local directory", "not in the local HF cache", "resolving it on the hub"):
        assert tried in err
    assert not (tmp_path / "content.parquet.d").exists()  # nothing embedded, no store started
    assert runs_in(tmp_path) == []  # refused before a run was created
    # with the hub switched off, the message says so (and asks the hub nothing)
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("asked the hub while offline"))
    with pytest.raises(ModelNotAvailable, match=r"embed.model 'org/nope'.*switched off \(HF_HUB_OFFLINE=1\)"):
        resolve_model("org/nope")


# ---- 9: a corrupt content store: exit 3, the store untouched -----------------------------------

def test_corrupt_content_store_exits_3_and_is_left_as_is(tmp_path, model_cache, capsys):
    store = tmp_path / "content.parquet.d"
    store.mkdir()
    (store / "manifest.json").write_bytes(b'{"format": "learn.content_st')
    rc = pipeline_main(["--config", TINY, *outputs(tmp_path, model_cache), "--no-progress", "train.epochs=1"])
    err = error_line(capsys.readouterr().err)
    assert rc == 3, err
    assert err.startswith("data error: content store ") and "manifest.json is unreadable" in err and "delete" in err
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json"]
    assert (store / "manifest.json").read_bytes() == b'{"format": "learn.content_st'
    assert runs_in(tmp_path) == []  # refused before a run was created


# ---- 10: silent handling made visible ------------------------------------------------------------

def write_dataset(directory: Path) -> Path:
    """8 items with text and 3 without ("NaN"/"null", "None", whitespace); 6 users x 4 interactions,
    user u0 out of time order in the file (1 row back), u1 with sub-second times in reverse file order
    (1 row back), and 3 interactions on the text-less items."""
    directory.mkdir()
    rows = [f"i{k},Item number {k},Brand {k % 3}" for k in range(8)]
    rows += ['x,NaN,null', 'y,None,', 'z,  ,nan']
    (directory / "items.csv").write_text("item_id,title,brand\n" + "\n".join(rows) + "\n")
    inter = ["u0,i0,10", "u0,i2,30", "u0,i1,20", "u0,i3,40",
             "u1,i4,100.7", "u1,i5,100.2", "u1,i6,200", "u1,i7,300"]
    inter += [f"u{u},i{(u + j) % 8},{10 * j}" for u in range(2, 6) for j in range(4)]
    inter += ["u2,x,1000", "u3,y,1000", "u4,z,1000"]
    (directory / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(inter) + "\n")
    return directory


def test_missing_text_literals_are_missing_text(tmp_path):
    data = write_dataset(tmp_path / "shop")
    raw, seqs = load_sequences(load_config(TINY, [f"data.path={data}"]).data)
    assert raw.drops.counts["item_without_text"] == 3 and set(raw.drops.examples["item_without_text"]) == {"x", "y", "z"}
    assert raw.drops.counts["interaction_item_without_text"] == 3
    assert seqs.num_items == 8 and not any(t in text for text in seqs.texts for t in ("NaN", "None", "null"))
    with pytest.raises(DataError, match=r"items\.csv: line 10: item 'x' has no text .*3 such items"):
        load_sequences(load_config(TINY, [f"data.path={data}", "data.missing_text=fail"]).data)
    # one field missing, another present: the text keeps what is there, never the literal
    (data / "items.csv").write_text("item_id,title,brand\na,Scale,NULL\n")
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\nu,a,1\n")
    raw, seqs = load_sequences(load_config(TINY, [f"data.path={data}"]).data)
    assert seqs.texts == ["Scale."]
    assert clean("null") == "" and clean(["NaN", "red"]) == "red"  # Amazon 2018 meta fields too


def test_unisrec_missing_text_literal_names_the_line(tmp_path):
    d = tmp_path / "Toy"
    d.mkdir()
    (d / "Toy.item2index").write_text("A\t0\nB\t1\n")
    (d / "Toy.text").write_text("item_id:token\ttext:token_seq\nA\tA lamp\nB\tnan\n")
    with pytest.raises(DataError, match=r"Toy\.text: line 3: 1 catalog item\(s\) .* no text \(e\.g\. 'B'\)"):
        load_sequences(load_config(TINY, [f"data.path={d}"]).data)


def test_reordered_and_sub_second_timestamps_are_counted_and_kept(tmp_path):
    data = write_dataset(tmp_path / "shop")
    raw, seqs = load_sequences(load_config(TINY, [f"data.path={data}"]).data)
    assert raw.drops.changed == {"reordered_timestamps": 2}
    assert raw.drops.metrics()["reordered_timestamps"] == 2 and raw.drops.total == 6  # kept rows are not drops
    assert "reordered_timestamps: 2" in raw.drops.summary()
    order = {u: [seqs.item_ids[i] for i in s] for u, s in zip(seqs.user_ids, seqs.seqs)}
    assert order["u0"] == ["i0", "i1", "i2", "i3"]
    assert order["u1"] == ["i5", "i4", "i6", "i7"]  # 100.2 before 100.7 (flooring would keep file order)
    with pytest.raises(DataError, match=r"interaction row 2 \(user 'u0'\) has timestamp 20(\.0)?, earlier than"):
        load_sequences(load_config(TINY, [f"data.path={data}", "data.unsorted_timestamps=fail"]).data)


def test_pipeline_reports_the_counts(tmp_path, model_cache, capsys):
    data = write_dataset(tmp_path / "shop")
    cfg = load_config(TINY, [*outputs(tmp_path, model_cache), f"data.path={data}", "train.epochs=1",
                             "export.enabled=false", "export.plots=false"])
    result = run_pipeline(cfg, progress=False)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[data]"))
    assert "item_without_text: 3" in line and "reordered_timestamps: 2" in line
    metrics = mlflow.MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["reordered_timestamps"] == 2 and metrics["dropped_item_without_text"] == 3
    assert metrics["dropped_rows_total"] == 6


def test_misspelled_retriever_param_is_refused(served, tracking):  # noqa: F811
    _, directory, _ = served
    with mlflow.start_run(experiment_id=tracking[1]):
        info = log_retriever(directory, max_history=MAX_HISTORY)
    model = mlflow.pyfunc.load_model(info.model_uri)
    histories = pd.DataFrame({"history": [IDS[:3]]})
    with pytest.raises(ValueError, match=r"unknown params \['kk'\]; the retriever takes 'k' and 'exclude_history'"):
        model.predict(histories, params={"kk": 5})
    with pytest.raises(ValueError, match=r"unknown params \['kk'\]"):
        model.predict(histories, params={"k": 3, "kk": 5})
    assert len(model.predict(histories, params={"k": 3})["item_ids"][0]) == 3
    # another model's dropped params stay MLflow's business (its warning passes)
    other = logging.LogRecord("mlflow.models.utils", logging.WARNING, "", 0, "Unrecognized params ['b'] are ignored "
                              "for inference. Supported params are: {'a'}. To enable them, ...", None, None)
    assert _refuse_dropped_params(other) is True


# ---- 13: the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["data", "--help"]])
def test_help_goes_to_stdout_with_exit_0(capsys, argv):
    assert learn_main(argv) == 0
    out, err = capsys.readouterr()
    assert "learn run --config" in out and "learn data download" in out and "learn/config.py" in out and err == ""


@pytest.mark.parametrize("argv, needle", [([], ""), (["bogus"], "unknown command 'bogus'"),
                                          (["data"], "unknown command 'data'"), (["data", "bogus"], "'data bogus'")])
def test_no_or_bad_command_is_usage_on_stderr_exit_2(capsys, argv, needle):
    assert learn_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "learn run --config" in err and needle in err


def test_options_after_overrides(tmp_path):
    seen = []
    rc = run_flow(["seed=3", "--no-progress", "--config", TINY, "train.epochs=1"], "x", "doc",
                  lambda cfg, progress: seen.append((cfg.seed, cfg.train.epochs, cfg.data.demo.num_items, progress)) or "ok")
    assert rc == 0 and seen == [(3, 1, 120, False)]  # tiny.yaml's 120 demo items: --config after an override read


@pytest.mark.parametrize("flow, needles", [
    ("full_pipeline", ["learn/config.py", "--config", "--no-progress"]),
    ("reembed", ["learn/config.py", "--config", "--no-progress"]),
    ("compare", ["--promote", "--data", "--split"]),  # takes no config keys: every option is listed
])
def test_every_flow_help_says_where_the_keys_are(capsys, flow, needles):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"flows.{flow}").main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(n in out for n in needles)


# ---- from outside: exit code and no traceback (three subprocesses) --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("extra, rc, needle", [
    (["train.lr=nan"], 2, "config error: override 'train.lr=nan': key 'train.lr' expects a finite number"),
    (["embed.model=nonexistent"], 2, "config error: embed.model 'nonexistent' names no loadable model"),
    ([], 3, "data error: content store "),
])
def test_flow_exit_codes_from_outside(tmp_path, model_cache, extra, rc, needle):
    if not extra:  # the corrupt-store case
        (tmp_path / "content.parquet.d").mkdir()
        (tmp_path / "content.parquet.d" / "manifest.json").write_text("{")
    proc = subprocess.run([sys.executable, "flows/full_pipeline.py", "--config", TINY, "--no-progress",
                           *outputs(tmp_path, model_cache), "train.epochs=1", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == rc, proc.stderr[-3000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
