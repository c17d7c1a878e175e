"""Test doubles and hooks (kept out of the library): failure injection for the Ray Train tests."""

import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import torch

# Ray workers unpickle these hooks: ship the module by value, the workers need not import tests/
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class FailOnce:
    """A ``WorkerHook`` for recovery tests: raises as ``epoch`` starts on ``rank``, the first time only
    (``marker`` records that it fired); every call is appended to ``log`` as "<epoch> <rank>"."""

    marker: str
    epoch: int
    rank: int = 0
    log: str | None = None

    def __call__(self, epoch: int, rank: int) -> None:
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(f"{epoch} {rank}\n")
        if epoch == self.epoch and rank == self.rank and not Path(self.marker).exists():
            Path(self.marker).write_text("failed once\n")
            raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank}")


def swap_catalog(model, content: torch.Tensor) -> None:
    """Give an eager ``TwinTowers`` another catalog (e.g. re-embedded items) as the reference for an
    exported tower; the centring statistics stay as trained."""
    padded = torch.cat([torch.zeros(1, content.shape[1], device=content.device), content.float()], 0)
    model.content = padded.to(model.content_mean.device)
