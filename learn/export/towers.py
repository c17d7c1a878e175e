"""Standalone user and item towers that work on content vectors, exported with ``torch.export``.

The artifacts (``user_tower.pt2``, ``item_tower.pt2``) load with torch alone, without this
package, and take raw content vectors rather than catalog indices: items never seen in training
can be embedded, and histories can be encoded from their items' vectors.

Towers with item ID embeddings (``model.item_id_embedding``) take one more input, the items' ID
vectors (``TwinTowers.id_vectors``; zeros for an item without one, e.g. any item new since
training): ``user(history, lengths, history_ids)`` and ``item(content, ids)``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from learn.towers.model import TowerConfig, TwinTowers
from learn.utils import atomic_path

USER_TOWER = "user_tower.pt2"
ITEM_TOWER = "item_tower.pt2"
TOWERS_STATE = "towers_state.pt"
TOWER_CONFIG = "tower_config.json"


def _stack(model: TwinTowers) -> TwinTowers:
    """A copy of ``model`` in eval mode that shares its parameters and centring buffers but not
    the catalog ``content`` buffer (so exports stay catalog-free) nor its train/eval flags."""
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), model.content_mean, model.content_scale)}
    memo[id(model.content)] = None
    if model.cfg.num_id_items:  # nor the ID tables: the exported towers take ID vectors as an input
        for stack in model.stacks:
            if stack.id_embedding is not None:
                memo[id(stack.id_embedding)] = None
        memo[id(model.id_known)] = None
    return copy.deepcopy(model, memo).eval()


class UserTower(nn.Module):
    """Right-padded histories of content vectors -> user vectors (output at the last real item)."""

    def __init__(self, model: TwinTowers):
        super().__init__()
        self.towers = _stack(model)
        self.eval()

    def forward(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``history`` float32 [B, L, d_llm] (zeros after each row's ``lengths``), ``lengths`` int64
        [B] in 1..L -> float32 [B, d_out]."""
        return self._encode(history, lengths, None)

    def _encode(self, history: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        ok = ((lengths >= 1) & (lengths <= history.shape[1])).all()
        torch._assert_async(ok, "UserTower: every length must be in 1..L (no empty histories)")
        positions = torch.arange(history.shape[1], device=history.device)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)
        out = self.towers.encode_vectors(history, valid, user=True, id_vectors=ids)
        return out[torch.arange(history.shape[0], device=history.device), lengths - 1]


class UserTowerWithIds(UserTower):
    def forward(self, history: torch.Tensor, lengths: torch.Tensor, history_ids: torch.Tensor) -> torch.Tensor:
        """As :class:`UserTower`, plus ``history_ids`` float32 [B, L, id width] (zeros: no ID vector)."""
        return self._encode(history, lengths, history_ids)


class ItemTower(nn.Module):
    """Content vectors -> item vectors, each item alone (works for items never seen in training)."""

    def __init__(self, model: TwinTowers):
        super().__init__()
        self.towers = _stack(model)
        self.eval()

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        """``content`` float32 [M, d_llm] -> float32 [M, d_out]."""
        if self.towers.cfg.item_tower == "c":
            return F.normalize(self.towers.center_vectors(content), dim=-1)
        return self.towers.encode_vectors(content.unsqueeze(1))[:, 0]


class ItemTowerWithIds(ItemTower):
    def forward(self, content: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``content`` float32 [M, d_llm], ``ids`` float32 [M, id width] -> float32 [M, d_out]."""
        return self.towers.encode_vectors(content.unsqueeze(1), id_vectors=ids.unsqueeze(1))[:, 0]


def _export(module: nn.Module, args: tuple, dynamic_shapes: dict) -> torch.export.ExportedProgram:
    # The fused eval-mode encoder-layer kernel would be taken under no_grad or with frozen weights;
    # tracing the plain layer keeps the exported graph independent of the caller's grad mode.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_towers(model: TwinTowers, out_dir: str | Path) -> dict[str, Path]:
    """Write the user and item towers (``.pt2``), the weights without the catalog, and the config.

    Exports are made on CPU with dynamic batch and sequence sizes (sequence length is capped at
    ``max_len`` when positions are learned). Returns {"user_tower", "item_tower", "state", "config"}.
    """
    out_dir = Path(out_dir)
    cfg = model.cfg
    with_ids = model.id_width > 0
    user, item = (UserTowerWithIds(model), ItemTowerWithIds(model)) if with_ids else (UserTower(model), ItemTower(model))
    if any(t.device.type != "cpu" for t in model.state_dict().values()):
        user, item = copy.deepcopy(user).cpu(), copy.deepcopy(item).cpu()  # copies: the model stays put
    seq = Dim("seq", min=1, max=cfg.max_len) if cfg.positions == "learned" else Dim("seq", min=1)
    batch, items = Dim("batch", min=1), Dim("items", min=1)
    user_args, user_dims = [torch.randn(2, 3, cfg.d_llm), torch.tensor([3, 1])], {"history": {0: batch, 1: seq},
                                                                                 "lengths": {0: batch}}
    item_args, item_dims = [torch.randn(3, cfg.d_llm)], {"content": {0: items}}
    if with_ids:  # the ID vectors, one more input of each tower
        user_args.append(torch.randn(2, 3, model.id_width))
        user_dims["history_ids"] = {0: batch, 1: seq}
        item_args.append(torch.randn(3, model.id_width))
        item_dims["ids"] = {0: items}
    user_ep = _export(user, tuple(user_args), user_dims)
    item_ep = _export(item, tuple(item_args), item_dims)

    paths = {
        "user_tower": out_dir / USER_TOWER,
        "item_tower": out_dir / ITEM_TOWER,
        "state": out_dir / TOWERS_STATE,
        "config": out_dir / TOWER_CONFIG,
    }
    for key, ep in (("user_tower", user_ep), ("item_tower", item_ep)):
        with atomic_path(paths[key]) as tmp, open(tmp, "wb") as fh:
            torch.export.save(ep, fh)
    save_tower_weights(model, out_dir)
    return paths


def save_tower_weights(model: TwinTowers, out_dir: str | Path) -> dict[str, Path]:
    """The weights without the catalog (``towers_state.pt``) and the config (``tower_config.json``):
    the one weights format, read back by :func:`load_twin_towers`. Returns {"state", "config"}."""
    out_dir = Path(out_dir)
    paths = {"state": out_dir / TOWERS_STATE, "config": out_dir / TOWER_CONFIG}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    assert "content" not in state  # non-persistent: the catalog lives with the content store
    with atomic_path(paths["state"]) as tmp:
        torch.save(state, tmp)
    with atomic_path(paths["config"]) as tmp:
        tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def load_user_tower(path: str | Path) -> nn.Module:
    """The exported user tower: ``(history [B, L, d_llm], lengths [B]) -> [B, d_out]``."""
    return torch.export.load(str(path)).module()


def load_item_tower(path: str | Path) -> nn.Module:
    """The exported item tower: ``content [M, d_llm] -> [M, d_out]``."""
    return torch.export.load(str(path)).module()


def load_twin_towers(out_dir: str | Path, content: torch.Tensor, id_known: torch.Tensor | None = None) -> TwinTowers:
    """Rebuild a ``TwinTowers`` from ``save_tower_weights`` output and a catalog's content vectors
    (trained centring statistics are kept; ``id_known`` for towers with item ID embeddings)."""
    out_dir = Path(out_dir)
    cfg = TowerConfig(**json.loads((out_dir / TOWER_CONFIG).read_text(encoding="utf-8")))
    model = TwinTowers(cfg, content, id_known=id_known)
    model.load_state_dict(torch.load(out_dir / TOWERS_STATE, map_location="cpu", weights_only=True))
    return model.eval()
