"""What every DDP worker receives: a few flat arrays it can map zero-copy from the object store,
not one Python object per user, and a content matrix the towers use without copying it."""

import pickle

import numpy as np
import torch

from learn.config import EvalConfig, TrainConfig
from learn.data.sequences import EvalSplit, Splits
from learn.towers.model import TwinTowers
from learn.train.distributed import make_spec
from tests.train.test_loop import model_for


def _splits(n_users: int, n_items: int, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, n_items, int(rng.integers(3, 30))) for _ in range(n_users)]
    valid = EvalSplit(np.arange(n_users), [s[:-2] for s in seqs], np.array([s[-2] for s in seqs]))
    test = EvalSplit(np.arange(n_users), [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))
    return Splits("leave_one_out", [s[:-2] for s in seqs], valid, test)


def test_the_worker_spec_is_flat_arrays_whatever_the_number_of_users():
    """Pickled as Ray does (protocol 5, arrays out of band): the number of buffers and the in-band
    bytes do not grow with the users, so workers on a node map one shared copy."""
    content = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    sizes = {}
    for n_users in (1_000, 20_000):
        spec = make_spec(model_for(torch.from_numpy(content)), _splits(n_users, 200), TrainConfig(), EvalConfig(), 10)
        buffers = []
        inband = pickle.dumps(spec, protocol=5, buffer_callback=buffers.append)
        sizes[n_users] = (len(buffers), len(inband))
        # the sequences travel as data: their values are one buffer, not n_users small ones
        assert sum(b.raw().nbytes for b in buffers) >= spec.train.values.nbytes
    (b_small, in_small), (b_large, in_large) = sizes[1_000], sizes[20_000]
    assert b_small == b_large < 40, sizes
    assert in_large < in_small + 4_096, sizes


def test_towers_use_a_padded_read_only_matrix_without_copying_it():
    content = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
    ref = model_for(torch.from_numpy(content))
    shared = ref.content.detach().numpy().copy()
    shared.flags.writeable = False
    with np.testing.suppress_warnings() as sup:
        sup.filter(UserWarning)
        buffer = torch.from_numpy(shared)
    twin = TwinTowers(ref.cfg, buffer, padded=True)
    twin.load_state_dict(ref.state_dict())
    assert np.shares_memory(twin.content.numpy(), shared)  # the worker's towers hold no copy
    torch.testing.assert_close(twin.content_mean, ref.content_mean)
    torch.testing.assert_close(twin.all_item_embeddings(), ref.all_item_embeddings())
