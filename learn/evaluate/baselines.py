"""No-training floors on the frozen content vectors: items are their raw content vectors and a user
is the mean of its history's content vectors (``content_mean``) or its last item's
(``content_last``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from learn.data.sequences import EvalSplit


def content_user_vectors(content: np.ndarray, split: EvalSplit, how: str, max_history: int) -> torch.Tensor:
    """One vector per evaluated user from the last ``max_history`` items of its history."""
    vecs = torch.as_tensor(content, dtype=torch.float32)
    rows = []
    for h in split.histories:
        h = torch.tensor(np.asarray(h)[-max_history:], dtype=torch.long)
        rows.append(vecs[h].mean(0) if how == "content_mean" else vecs[h[-1]])
    return F.normalize(torch.stack(rows), dim=-1)


def content_item_vectors(content: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.as_tensor(content, dtype=torch.float32), dim=-1)
