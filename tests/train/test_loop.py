"""The one-process training loop on a synthetic task where content predicts the next item."""

import numpy as np
import pytest
import torch

from learn.config import EvalConfig, TrainConfig
from learn.data.sequences import EvalSplit, Splits
from learn.towers.model import TowerConfig, TwinTowers
from learn.train.fit import fit
from learn.train.loop import evaluate_model, make_scheduler


def synthetic(n_items=40, n_users=120, seed=0):
    """Item i is followed by item (i + 1) % n; content vectors are random but fixed."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, L = int(rng.integers(n_items)), int(rng.integers(5, 10))
        seqs.append((start + np.arange(L)) % n_items)
    train = [s[:-2] for s in seqs]
    valid = EvalSplit(np.arange(n_users), [s[:-2] for s in seqs], np.array([s[-2] for s in seqs]))
    test = EvalSplit(np.arange(n_users), [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))
    content = torch.as_tensor(rng.normal(size=(n_items, 16)) + 2.0, dtype=torch.float32)
    return Splits("leave_one_out", train, valid, test), content


def model_for(content, item_tower="a"):
    torch.manual_seed(0)
    return TwinTowers(TowerConfig(d_llm=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0,
                                  d_out=16 if item_tower == "c" else 32, item_tower=item_tower), content)


@pytest.mark.parametrize("recipe,extra", [("full_softmax", {}), ("full_softmax", {"all_positions": True}),
                                          ("in_batch", {}), ("dense_all_action", {"n_history": 3, "n_targets": 3,
                                                                                  "target_len": 5})])
def test_each_recipe_learns_the_transition(recipe, extra):
    splits, content = synthetic()
    model = model_for(content)
    ev = EvalConfig(ks=[10])
    before = evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"]
    tc = TrainConfig(recipe=recipe, epochs=25, batch_size=32, lr=3e-3, patience=0, **extra)
    result = fit(model, splits, tc, ev, max_history=10, progress=False)
    after = evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # dense targets are sampled over the whole future window, not just the next item: a smaller gain
    assert after > before + (0.1 if recipe == "dense_all_action" else 0.2), (before, after)
    assert after == pytest.approx(result.best_valid["valid_ndcg_at_10"])  # best weights are the ones loaded


def test_early_stopping_restores_the_best_epoch(monkeypatch):
    splits, content = synthetic()
    model = model_for(content)
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.1, 0.05])
    snapshots = {}

    def fake_eval(m, split, ev, max_history, train_popularity=None, prefix="", item_bias=None):
        epoch = len(snapshots) + 1
        snapshots[epoch] = {k: v.clone() for k, v in m.state_dict().items()}
        return {f"{prefix}ndcg_at_10": next(scores)}

    monkeypatch.setattr("learn.train.fit.evaluate_model", fake_eval)
    result = fit(model, splits, TrainConfig(epochs=6, patience=2, lr=1e-2), EvalConfig(ks=[10]), 10, progress=False)
    assert result.best_epoch == 2 and result.stopped_early and len(result.history) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k]), k


def test_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(epochs=4, warmup_epochs=1), steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_validation_may_score_a_fixed_user_sample():
    splits, content = synthetic()
    model = model_for(content)
    result = fit(model, splits, TrainConfig(epochs=2, lr=1e-2, patience=0), EvalConfig(ks=[10], valid_max_users=25),
                 10, progress=False)
    assert [row["valid_users"] for row in result.history] == [25, 25]
    test = evaluate_model(model, splits.test, EvalConfig(ks=[10], valid_max_users=25), 10, prefix="test_")
    assert test["test_users"] == len(splits.test)  # the test split is always scored whole


# --- train.device / train.precision ------------------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")


def test_resolve_device_choices():
    from learn.config import ConfigError
    from learn.device import resolve_device

    assert resolve_device("cpu", "train.device") == torch.device("cpu")
    assert resolve_device("auto", "train.device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'train.device'"):
        resolve_device("gpu", "train.device")


@no_cuda
def test_fit_on_cuda_without_a_gpu_names_the_key():
    from learn.config import ConfigError

    splits, content = synthetic()
    with pytest.raises(ConfigError, match="train.device=cuda"):
        fit(model_for(content), splits, TrainConfig(device="cuda", epochs=1), EvalConfig(ks=[10]), 10, progress=False)


def test_train_device_is_for_the_local_backend_only():
    from learn.config import ConfigError, load_config

    assert load_config(None, ["train.device=auto", "train.precision=bf16"]).train.device == "auto"
    with pytest.raises(ConfigError, match="train.device=cuda.*train.backend=ray.*train.use_gpu"):
        load_config(None, ["train.device=cuda", "train.backend=ray"])
    with pytest.raises(ConfigError, match="'train.precision' must be one of"):
        load_config(None, ["train.precision=fp16"])


def test_bf16_step_runs_the_towers_in_bfloat16_and_stays_near_fp32():
    from learn.train.loop import make_optimizer, train_step
    from learn.train.recipes import epoch_batches

    splits, content = synthetic()
    tc = TrainConfig(batch_size=32)
    batch = next(iter(epoch_batches(splits.train, tc, 10, seed=0, epoch=1, num_items=len(content))))
    losses, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        model = model_for(content)
        seen = []
        model.stacks[0].adaptor.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        cfg = TrainConfig(batch_size=32, precision=precision)
        losses[precision] = train_step(model, batch, make_optimizer(model, cfg), None, cfg)
        dtypes[precision] = set(seen)
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_two_stage_fine_tunes_from_the_best_pretraining_epoch_and_selects_over_both(monkeypatch):
    """train.pretrain_epochs: the pre-training recipe first (own early stopping), then train.recipe
    from the best pre-training weights; epochs numbered on; the best epoch may be a pre-training one."""
    import learn.train.fit as fit_module

    splits, content = synthetic()
    model = model_for(content)
    # stage 1 peaks at its epoch 2 and stops (patience 2) after epoch 4; stage 2 never beats 0.5 and
    # stops after two epochs (of its 3)
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.45])
    snapshots, starts = {}, []

    def fake_eval(m, split, ev, max_history, train_popularity=None, prefix="", item_bias=None):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return {f"{prefix}ndcg_at_10": next(scores)}

    real_optimizer = fit_module.make_optimizer

    def spy_optimizer(m, cfg):
        starts.append((cfg.recipe, {k: v.clone() for k, v in m.state_dict().items()}))
        return real_optimizer(m, cfg)

    monkeypatch.setattr(fit_module, "evaluate_model", fake_eval)
    monkeypatch.setattr(fit_module, "make_optimizer", spy_optimizer)
    tc = TrainConfig(recipe="full_softmax", epochs=3, patience=2, lr=1e-2, batch_size=32, pretrain_epochs=5)
    result = fit(model, splits, tc, EvalConfig(ks=[10]), 10, progress=False)
    assert [(int(r["epoch"]), int(r["stage"])) for r in result.history] == [(1, 1), (2, 1), (3, 1), (4, 1),
                                                                            (5, 2), (6, 2)]
    assert [recipe for recipe, _ in starts] == ["in_batch", "full_softmax"]
    for k, v in starts[1][1].items():  # stage 2 starts from epoch 2's weights, not the last epoch's
        torch.testing.assert_close(v, snapshots[2][k])
    assert result.best_epoch == 2
    for k, v in model.state_dict().items():  # fine-tuning never beat it: the pre-trained weights stay
        torch.testing.assert_close(v, snapshots[2][k])
    assert not torch.equal(snapshots[6]["stacks.0.adaptor.weight"], snapshots[2]["stacks.0.adaptor.weight"])


def test_two_stage_fit_learns():
    splits, content = synthetic()
    model = model_for(content)
    ev = EvalConfig(ks=[10])
    before = evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"]
    tc = TrainConfig(recipe="full_softmax", epochs=10, batch_size=32, lr=3e-3, patience=0, pretrain_epochs=10)
    result = fit(model, splits, tc, ev, max_history=10, progress=False)
    assert len(result.history) == 20 and result.history[10]["stage"] == 2
    assert evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"] > before + 0.2
