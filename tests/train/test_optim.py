"""learn/train/optim.py: lazy AdamW rows for sparse item ID gradients, and clipping that takes them."""

import numpy as np
import torch

from learn.config import TrainConfig
from learn.train.loop import make_optimizer, train_step
from learn.train.optim import LazyAdamW, clip_gradients
from learn.train.recipes import epoch_batches
from tests.train.test_member_groups import synthetic_id_towers


def tables(sparse: bool, seed: int = 0):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(20, 4, sparse=sparse)
    lin = torch.nn.Linear(4, 1)
    return emb, lin


def run(sparse: bool, batches, steps_state=None, wd=0.1):
    emb, lin = tables(sparse)
    opt = LazyAdamW(list(emb.parameters()) + list(lin.parameters()), lr=0.05, weight_decay=wd)
    for rows in batches:
        opt.zero_grad(set_to_none=True)
        (lin(emb(rows)) ** 2).sum().backward()
        clip_gradients(list(emb.parameters()) + list(lin.parameters()), 0.5)
        opt.step()
    return emb, lin, opt


def test_touching_every_row_each_step_equals_dense_adamw():
    every = [torch.randperm(20) for _ in range(6)]
    dense_emb, dense_lin, _ = run(False, every)
    emb, lin, _ = run(True, every)
    assert emb.weight.grad.is_sparse
    torch.testing.assert_close(emb.weight, dense_emb.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.weight, dense_lin.weight, rtol=1e-5, atol=1e-6)
    # the dense path is torch's AdamW itself
    torch.manual_seed(0)
    ref_emb, ref_lin = tables(False)
    params = list(ref_emb.parameters()) + list(ref_lin.parameters())
    ref = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for rows in every:
        ref.zero_grad(set_to_none=True)
        (ref_lin(ref_emb(rows)) ** 2).sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        ref.step()
    assert torch.equal(ref_emb.weight, dense_emb.weight) and torch.equal(ref_lin.weight, dense_lin.weight)


def test_rows_a_step_does_not_touch_keep_their_values_and_moments():
    emb, _, opt = run(True, [torch.tensor([1, 2, 2]), torch.tensor([3])])
    start, _ = tables(True)
    untouched = [r for r in range(20) if r not in (1, 2, 3)]
    assert torch.equal(emb.weight[untouched], start.weight[untouched])
    state = opt.state[emb.weight]
    assert torch.all(state["exp_avg"][untouched] == 0) and torch.all(state["exp_avg_sq"][untouched] == 0)
    assert torch.all(state["exp_avg"][[1, 2, 3]].abs().sum(1) > 0)
    assert not torch.equal(emb.weight[[1, 2, 3]], start.weight[[1, 2, 3]])
    # rows 1 and 2 were touched once (step 1), row 3 once (step 2): row 1's moment did not decay at step 2
    dense_emb, _, _ = run(False, [torch.tensor([1, 2, 2]), torch.tensor([3])])
    assert not torch.allclose(dense_emb.weight[untouched], start.weight[untouched])  # AdamW moves them (decay)


def test_clipping_takes_sparse_gradients_like_dense_ones():
    got = {}
    for sparse in (False, True):
        emb, lin = tables(sparse)
        (lin(emb(torch.tensor([1, 2, 2, 5]))) ** 2).sum().backward()
        norm = clip_gradients(list(emb.parameters()) + list(lin.parameters()), 0.1)
        grad = emb.weight.grad.to_dense() if sparse else emb.weight.grad
        total = torch.cat([grad.flatten(), lin.weight.grad.flatten(), lin.bias.grad.flatten()]).norm()
        assert abs(float(total) - 0.1) < 1e-4  # clipped to the max norm
        got[sparse] = (norm, grad.clone(), lin.weight.grad.clone())
    assert float(got[False][0]) > 0.1  # the norm before clipping
    for want, have in zip(got[False], got[True]):
        torch.testing.assert_close(have, want)


def test_id_towers_train_with_sparse_gradients_as_with_dense_ones():
    """Full softmax touches every seen item's ID row at each step: sparse and dense ID gradients give the
    same weights after a few steps; the ID tables' gradients are sparse by default."""
    results = []
    for sparse in (True, False):
        splits, model = synthetic_id_towers(dropout=0.0)
        model.sparse_id_gradients(sparse)
        tc = TrainConfig(recipe="full_softmax", batch_size=32, lr=1e-2, softmax_items="seen")
        opt = make_optimizer(model, tc)
        for batch in list(epoch_batches(splits.train, tc, 10, 0, 1, num_items=model.num_items))[:4]:
            train_step(model, batch, opt, None, tc)
        assert model.stacks[1].id_embedding.weight.grad.is_sparse == sparse
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(results[0]["stacks.1.id_embedding.weight"],
                           synthetic_id_towers()[1].state_dict()["stacks.1.id_embedding.weight"])


def test_a_resumed_optimizer_continues_as_the_uninterrupted_one():
    batches = [torch.tensor([1, 2]), torch.tensor([2, 7]), torch.tensor([7, 9])]
    whole, _, _ = run(True, batches)
    emb, lin, opt = run(True, batches[:2])
    saved = opt.state_dict()
    emb2, lin2 = tables(True)
    emb2.load_state_dict(emb.state_dict())
    lin2.load_state_dict(lin.state_dict())
    opt2 = LazyAdamW(list(emb2.parameters()) + list(lin2.parameters()), lr=0.05, weight_decay=0.1)
    opt2.load_state_dict(saved)
    opt2.zero_grad(set_to_none=True)
    (lin2(emb2(batches[2])) ** 2).sum().backward()
    clip_gradients(list(emb2.parameters()) + list(lin2.parameters()), 0.5)
    opt2.step()
    torch.testing.assert_close(emb2.weight, whole.weight)
    assert np.isfinite(emb2.weight.detach().numpy()).all()


def _mean_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from learn.train.distributed import mean_sparse_gradients

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    emb = torch.nn.Embedding(12, 3, sparse=True)
    frozen = torch.nn.Embedding(12, 3, sparse=True)
    frozen.weight.requires_grad_(False)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    rows = torch.tensor([[1, 2, 2], [2, 7, 9]][rank])
    (emb(rows) * (rank + 1)).sum().backward()
    if rank == 1:
        emb.weight.grad = None  # rank 1 sends no rows for this one: as if its batch had no ID item
        (emb(torch.tensor([9])) * 3).sum().backward()
    other = torch.nn.Embedding(12, 3, sparse=True)
    if rank == 0:  # rank 1 has no gradient at all for this one
        other(torch.tensor([4])).sum().backward()
    mean_sparse_gradients([("a", emb.weight), ("frozen", frozen.weight), ("other", other.weight)])
    assert frozen.weight.grad is None
    torch.save((emb.weight.grad.to_dense(), other.weight.grad.to_dense()), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_sparse_gradients_are_averaged_over_ranks_by_their_rows(tmp_path):
    """mean_sparse_gradients (the DDP workers' ID tables): every rank ends with the mean of the ranks'
    sparse gradients, as DDP averages dense ones; no process group beyond two local gloo ranks."""
    import torch.multiprocessing as mp

    mp.spawn(_mean_worker, args=(f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    want = torch.zeros(12, 3)
    want[1] += 1 / 2
    want[2] += 2 / 2  # rank 0 touches row 2 twice
    want[9] += 3 / 2  # rank 1's only row
    other = torch.zeros(12, 3)
    other[4] = 1 / 2
    for rank in (0, 1):
        got, got_other = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_other, other)
