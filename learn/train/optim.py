"""The optimiser and gradient clipping for towers with item ID tables (``model.item_id_embedding``).

An ID table has a row per item, and a training step touches only the rows of its batch's items
(sampled softmax, in-batch, dense all-action) or of the items seen in training (full softmax). Its
gradient is sparse (``nn.Embedding(sparse=True)``), and ``LazyAdamW`` updates only those rows and their
moments: a step costs O(rows in the batch), not O(catalog) as a dense AdamW over the whole table does
(measured: bench/step_time.py, README). Every other parameter is updated by ``torch.optim.AdamW``
itself, unchanged; towers without ID tables train exactly as with AdamW.

The lazy rule is SparseAdam's: the moments of a row decay only on the steps that touch it, and the
bias correction counts the table's steps. Under the full softmax every seen item's row is touched at
every step, so the rule equals AdamW's there (up to the order of float sums).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class LazyAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``; a parameter whose gradient is sparse is updated lazily (see the module)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        for _, p, _ in sparse:  # AdamW skips a parameter without a gradient
            p.grad = None
        try:
            super().step()
        finally:
            for _, p, grad in sparse:
                p.grad = grad
        for group, p, grad in sparse:
            self._sparse_step(group, p, grad)
        return loss

    def _sparse_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("LazyAdamW: amsgrad and maximize are not supported for sparse gradients")
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows] = exp_avg
        state["exp_avg_sq"][rows] = exp_avg_sq
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        updated = p[rows]
        if group["weight_decay"]:
            updated.mul_(1 - lr * group["weight_decay"])
        updated.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        p[rows] = updated


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm over every gradient) that also takes sparse gradients
    (coalesced in place); without any it is that function itself."""
    params = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    squares = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            squares.append(p.grad.values().float().pow(2).sum())
        else:
            squares.append(p.grad.float().pow(2).sum())
    total = torch.stack(squares).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        (p.grad.values() if p.grad.is_sparse else p.grad).mul_(coef.to(p.grad.dtype))
    return total
