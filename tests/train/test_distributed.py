"""DDP training: sharded tower computation matches one process; Ray Train runs, logs and resumes."""

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from learn.config import EvalConfig, TrainConfig
from learn.train.distributed import MlflowTarget, ShardedRows, evaluate_sharded, fit_distributed
from learn.train.fit import fit
from learn.train.loop import evaluate_model, make_optimizer, make_scheduler, run_epoch, steps_per_epoch
from tests.fakes import FailOnce
from tests.train.test_loop import model_for, synthetic
from tests.train.test_member_groups import synthetic_id_towers

pytestmark = pytest.mark.slow  # real Ray (or spawned DDP processes): tens of seconds each

# batch 17 over 120 users: halves of 8/9 rows and a last batch of one row (one rank gets none)
CASES = {
    "full_softmax": TrainConfig(recipe="full_softmax", batch_size=17, lr=3e-3),
    "all_positions": TrainConfig(recipe="full_softmax", batch_size=17, lr=3e-3, all_positions=True),
    # the seen items' columns, each with its logit-adjustment bias
    "softmax_seen": TrainConfig(recipe="full_softmax", batch_size=17, lr=3e-3, all_positions=True,
                                softmax_items="seen", logit_adjustment=1.0),
    "in_batch": TrainConfig(recipe="in_batch", batch_size=17, lr=3e-3),
    "sampled_softmax": TrainConfig(recipe="sampled_softmax", batch_size=17, lr=3e-3, all_positions=True,
                                   num_negatives=24),
    "dense": TrainConfig(recipe="dense_all_action", batch_size=17, lr=3e-3, n_history=3, n_targets=3,
                         target_len=5),
    # dense_all_action's other modes: every position a cut with a horizon, and the paper's uncorrected loss
    "dense_every_cut_window_2": TrainConfig(recipe="dense_all_action", batch_size=17, lr=3e-3, all_positions=True,
                                            target_window=2, num_negatives=24),
    "dense_cut_window_2_uncorrected": TrainConfig(recipe="dense_all_action", batch_size=17, lr=3e-3, n_history=3,
                                                  n_targets=3, target_len=5, target_window=2, num_negatives=0,
                                                  logq_correction=False),
}
EPOCHS = 2
# measured: the 2-rank weights and losses differ from one process by <= 5e-7 (float rounding of
# half-size matmuls); ATOL leaves 20x room. One exception: the attention's key bias has zero gradient
# in exact arithmetic (it adds a constant to each query's logits), so its value is rounding noise
# that Adam scales up to ~1e-5 in either run; it changes no output and gets a loose bound.
ATOL = 1e-5
KEY_BIAS = "self_attn.in_proj_bias"


def assert_same_weights(got, want, label=""):
    for k, v in want.items():
        if k.endswith(KEY_BIAS):
            d = v.shape[0] // 3
            for part in (slice(0, d), slice(2 * d, 3 * d)):  # query and value biases: tight
                torch.testing.assert_close(got[k][part], v[part], atol=ATOL, rtol=0, msg=f"{label}: {k}")
            torch.testing.assert_close(got[k][d : 2 * d], v[d : 2 * d], atol=1e-3, rtol=0, msg=f"{label}: {k}")
        else:
            torch.testing.assert_close(got[k], v, atol=ATOL, rtol=0, msg=f"{label}: {k}")


def two_epochs(model, tc, rows_model=None, rank=0, world=1):
    splits, _ = synthetic()
    opt = make_optimizer(model, tc)
    sched = make_scheduler(opt, tc, steps_per_epoch(splits.train, tc.batch_size))
    kwargs = {} if world == 1 else {"rows": ShardedRows(rank, world)}
    return [run_epoch(rows_model or model, splits.train, tc, 10, opt, sched, 0, e, progress=False, **kwargs)
            for e in range(1, EPOCHS + 1)]


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for name, tc in CASES.items():
        _, content = synthetic()
        model = model_for(content)
        losses = two_epochs(model, tc, DistributedDataParallel(model, forward_sync_buffers=False), rank, world)
        torch.save({"losses": losses, "state": model.state_dict()}, Path(out_dir) / f"{name}-{rank}.pt")
    splits, content = synthetic()  # the sharded valid ranking, plain and with the training-score bias
    model = model_for(content)
    got = [evaluate_sharded(model, splits.valid, EvalConfig(ks=[10]), 10, rank, world, item_bias=bias)
           for bias in (None, _valid_bias(len(content)))]
    torch.save(got, Path(out_dir) / f"sharded-eval-{rank}.pt")
    dist.destroy_process_group()


def _valid_bias(n):
    return torch.linspace(0.0, 0.6, n)  # strong enough to move the ranking


def test_sharded_rows_under_ddp_give_the_one_process_steps(tmp_path):
    """Every recipe: two DDP ranks, each computing half the tower outputs, take the same steps."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    for name, tc in CASES.items():
        _, content = synthetic()
        model = model_for(content)
        torch.set_num_threads(1)
        try:
            losses = two_epochs(model, tc)
        finally:
            torch.set_num_threads(threads)
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        for got in ranks:
            assert got["losses"] == pytest.approx(losses, abs=ATOL), name
            assert_same_weights(got["state"], model.state_dict(), name)
        assert model.state_dict()["stacks.0.adaptor.weight"].ne(model_for(content).state_dict()["stacks.0.adaptor.weight"]).any()
    splits, content = synthetic()
    model = model_for(content)
    want = [evaluate_model(model, splits.valid, EvalConfig(ks=[10]), 10, item_bias=b)
            for b in (None, _valid_bias(len(content)))]
    assert want[0]["ndcg_at_10"] != pytest.approx(want[1]["ndcg_at_10"])
    for r in range(2):
        got = torch.load(tmp_path / f"sharded-eval-{r}.pt")
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-6)


# patience 1: one process stops after epoch 3 (valid NDCG@10 0.190, 0.240, 0.235; best epoch 2), so
# the Ray run must stop at the same epoch through the shared FitState and the broadcast decision
RAY_CFG = dict(recipe="full_softmax", epochs=8, batch_size=32, lr=1e-2, patience=1, num_workers=2, max_failures=1)


@pytest.fixture(scope="module")
def flaky_run(ray_local, tmp_path_factory):
    """One 2-worker Ray run (Ray runs are slow here: one serves both tests) in which rank 1 fails as
    epoch 2 starts; rank 0 logs into an MLflow run the 'driver' holds."""
    import mlflow

    tmp = tmp_path_factory.mktemp("ray-run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("ddp", artifact_location=str(tmp / "artifacts")))
    splits, content = synthetic()
    model = model_for(content)
    start = copy.deepcopy(model)
    hook = FailOnce(marker=str(tmp / "failed"), epoch=2, rank=1, log=str(tmp / "epochs.log"))
    result = fit_distributed(model, splits, TrainConfig(**RAY_CFG), EvalConfig(ks=[10]), 10, seed=0,
                             storage_path=tmp / "ray", run_name="flaky", worker_hook=hook,
                             tracking=MlflowTarget(uri, run.info.run_id))
    return {"result": result, "model": model, "start": start, "client": client, "run_id": run.info.run_id,
            "tmp": tmp}


def test_ray_ddp_matches_one_process_fit(flaky_run):
    """Two DDP workers (restarted once from the epoch-1 checkpoint) end where one process does,
    early stopping included."""
    splits, _ = synthetic()
    local = copy.deepcopy(flaky_run["start"])
    ref = fit(local, splits, TrainConfig(**RAY_CFG), EvalConfig(ks=[10]), 10, seed=0, progress=False)
    got = flaky_run["result"]
    assert [h["epoch"] for h in got.history] == [1, 2, 3] and got.best_epoch == ref.best_epoch == 2
    assert got.stopped_early and ref.stopped_early  # early stopping with patience > 0, on every rank
    # same batches, same global loss: equal up to float rounding (measured <= 5e-7)
    for mine, theirs in zip(got.history, ref.history):
        for k in ("train_loss", "lr", "valid_ndcg_at_10", "valid_recall_at_10", "valid_mrr"):
            assert mine[k] == pytest.approx(theirs[k], abs=ATOL), k
    assert got.best_valid["valid_ndcg_at_10"] == pytest.approx(ref.best_valid["valid_ndcg_at_10"], abs=ATOL)
    assert_same_weights(flaky_run["model"].state_dict(), local.state_dict())  # best weights, loaded


def test_ray_ddp_with_member_groups_matches_one_process_fit(ray_local, tmp_path):
    """A content-only member beside a member with item ID vectors on two Ray workers: every rank keeps the
    fit state, stops each group on its own valid score and freezes its replica of a stopped group, also
    after a restart (rank 1 fails as epoch 4 starts; the content group stopped after epoch 2, so the
    workers resume from epoch 3's checkpoint with it frozen); the history, each group's best epoch and
    the final weights are the one process's."""
    splits, model = synthetic_id_towers(dropout=0.0)
    start = copy.deepcopy(model)
    tc = TrainConfig(**{**RAY_CFG, "epochs": 10})
    hook = FailOnce(marker=str(tmp_path / "failed"), epoch=4, rank=1, log=str(tmp_path / "epochs.log"))
    got = fit_distributed(model, splits, tc, EvalConfig(ks=[10]), 10, seed=0, storage_path=tmp_path / "ray",
                          run_name="groups", worker_hook=hook)
    assert (tmp_path / "failed").exists()
    assert (tmp_path / "epochs.log").read_text().split("\n").count("4 1") == 2  # epoch 4 ran again
    local = copy.deepcopy(start)
    ref = fit(local, splits, tc, EvalConfig(ks=[10]), 10, seed=0, progress=False)
    stops = [r.get("valid_ndcg_at_10_content") for r in ref.history]
    assert len(set(stops[2:])) == 1 and stops[1] != stops[2]  # the content group frozen from epoch 3 on
    assert [h["epoch"] for h in got.history] == [h["epoch"] for h in ref.history]
    for mine, theirs in zip(got.history, ref.history):
        for k in ("train_loss", "valid_ndcg_at_10", "valid_ndcg_at_10_content", "valid_ndcg_at_10_ids"):
            assert mine[k] == pytest.approx(theirs[k], abs=ATOL), (mine["epoch"], k)
    assert got.best_epoch == ref.best_epoch
    assert got.best_valid["valid_ndcg_at_10"] == pytest.approx(ref.best_valid["valid_ndcg_at_10"], abs=ATOL)
    assert_same_weights(model.state_dict(), local.state_dict())


def test_ray_resumes_from_the_checkpoint_after_a_worker_failure(flaky_run):
    assert (flaky_run["tmp"] / "failed").exists()
    starts = [tuple(map(int, line.split())) for line in (flaky_run["tmp"] / "epochs.log").read_text().splitlines()]
    assert starts.count((1, 0)) == 1 and starts.count((1, 1)) == 1  # epoch 1 was not trained again
    assert starts.count((2, 1)) == 2 and starts.count((3, 1)) == 1  # epoch 2 was, after the restart
    # rank 0 logged every epoch exactly once into the driver's run, restart or not
    history = flaky_run["client"].get_metric_history(flaky_run["run_id"], "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["train_loss"] for h in flaky_run["result"].history])
    checkpoints = sorted(p.name for p in (flaky_run["tmp"] / "ray" / "flaky").glob("epoch_*"))
    assert checkpoints == ["epoch_0002", "epoch_0003"]  # num_to_keep=2
