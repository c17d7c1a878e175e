"""PAL: the preference-alignment twin towers.

Both towers share one stack:  content vector -> (centring) -> adaptor Linear(d_llm, d_model)
-> [+ learned positions] -> causal post-LN transformer -> head Linear(d_model, d_out) -> L2 norm.

positions   ``learned``: one zero-initialised embedding per window slot; ``none``: order reaches the towers
            through causal attention only; ``auto`` (``model.positions``, resolved before the towers are
            built, :func:`resolve_positions`): learned when the training interactions have on average at
            least ``model.positions_min_history`` earlier items (capped at ``data.max_history``), else none.

input views  ``input_views`` conditions the frozen vectors before the adaptor: ``center`` (catalog mean
            removed, rescaled to unit mean norm), ``whiten`` (ZCA whitening of the centred vectors with
            shrinkage: the covariance plus ``whiten_shrinkage`` x its mean eigenvalue), ``group`` (the
            same within ``whiten_groups`` contiguous blocks of dimensions). Every statistic is fitted
            once on the catalog the towers are built over and kept as a buffer, so exported towers
            apply the training catalog's statistics to new items unchanged. With several views each
            gets its own adaptor and their outputs are summed (with linear adaptors that is still one
            linear map: several views matter in front of ``adaptor=mlp``).
adaptor      ``linear`` (one Linear) or ``mlp`` (Linear(d_llm, hidden) -> GELU -> dropout -> Linear(hidden,
            d_model), hidden = ``adaptor_hidden`` or 2 x d_model when 0).

user tower  the stack over a user's history; the user vector is the output at the last real
            (non-padding) position.
item tower  variant a/b: the same stack over a single item (sequence length 1), so every item
            vector is computed from the item alone and can be cached; variant c: no alignment on
            the item side: the centred, normalised content vector itself (needs d_out == d_llm).

members     ``members`` = K > 1 gives K independently initialised stacks (adaptor to head) over the same
            centred inputs; a tower's output is the concatenation of the K normalised member outputs
            (d_out / K each) divided by sqrt(K), so a dot product is the mean of the members' cosines.
            Training takes each member's loss on its own slice (``member_slices``): an ensemble
            trained, selected and exported as one pair of towers.
id members  with item ID embeddings (``num_id_items``), ``id_members`` = k in 1..members-1 gives the ID
            vectors to the last k members only: the first members score from content alone, the last
            from content + IDs (``member_groups``: the two groups, which ``learn.train.fit`` early-stops
            apart, since ID members fit in a few epochs and content members keep learning). 0: every
            member has ID vectors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learn.config import ModelConfig, input_views_problem
from learn.data.ragged import Ragged


@dataclass
class TowerConfig:
    d_llm: int
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    d_out: int = 256
    positions: str = "none"  # none | learned (model.positions=auto is resolved before: resolve_positions)
    item_tower: str = "a"  # a | b | c
    center_inputs: bool = True
    max_len: int = 64
    user_head: str = "shared"  # shared | separate: the user side gets its own output Linear
    # ablation (transductive): a learned ID embedding added after the adaptor for items seen in
    # training; num_id_items = catalog size when on, 0 = off
    num_id_items: int = 0
    item_id_dropout: float = 0.0  # training only: share of item occurrences whose ID vector is left out
    members: int = 1  # independently initialised stacks whose outputs are concatenated (d_out / members each)
    id_members: int = 0  # with num_id_items: only the last id_members members get ID vectors (0: all of them)
    input_views: list[str] = field(default_factory=lambda: ["center"])  # center | whiten | group (see above)
    whiten_shrinkage: float = 0.1  # added to the covariance, as a multiple of its mean eigenvalue
    whiten_groups: int = 4  # blocks of dimensions the group view whitens separately
    adaptor: str = "linear"  # linear | mlp
    adaptor_hidden: int = 0  # the MLP adaptor's hidden width (0: 2 x d_model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_model_config(cls, m: ModelConfig, d_llm: int, num_id_items: int = 0) -> "TowerConfig":
        """The towers' config from ``model.*`` for an encoder of ``d_llm`` dimensions. Item tower c
        serves the raw content vectors, so its output dimension is the encoder's (``model.d_out``
        does not apply to it). ``model.positions=auto`` must be resolved first (:func:`resolve_positions`)."""
        if m.positions not in ("none", "learned"):
            raise ValueError(f"model.positions={m.positions!r} is decided from the training sequences: resolve it "
                             f"first (learn.towers.model.resolve_positions, or TwinTowers.from_config with train=)")
        shared = {f.name: getattr(m, f.name) for f in fields(cls) if hasattr(m, f.name)}
        shared["input_views"] = list(shared.get("input_views", ["center"]))
        if m.item_tower == "c":
            shared["d_out"] = d_llm
        return cls(d_llm=d_llm, num_id_items=num_id_items, **shared)


class TwinTowers(nn.Module):
    def __init__(self, cfg: TowerConfig, content: torch.Tensor, id_known: torch.Tensor | None = None,
                 padded: bool = False):
        """``content``: [num_items, d_llm] frozen content vectors (row = catalog index); with
        ``padded`` it is [1 + num_items, d_llm] with the pad row first (zeros) and is used as the
        buffer itself, without a copy (DDP workers share one read-only matrix this way).

        Index 0 of every sequence tensor is padding; catalog item i is token i + 1.
        ``id_known`` [num_items] bool: items seen in training, the only ones that get an ID embedding
        (``cfg.num_id_items > 0``); any other item (cold) keeps a zero ID vector and gets no gradient,
        also not as a negative.
        """
        super().__init__()
        full = content
        if padded:
            content = content[1:]
        if content.shape[1] != cfg.d_llm:
            raise ValueError(f"content vectors have dim {content.shape[1]}, config says d_llm={cfg.d_llm}")
        if cfg.members < 1 or cfg.d_out % cfg.members:
            raise ValueError(f"model.d_out ({cfg.d_out}) must be a multiple of model.members ({cfg.members})")
        if cfg.item_tower == "c" and cfg.members > 1:
            raise ValueError("item tower 'c' has no item-side stack to ensemble: use model.members=1")
        check_input_views(cfg)
        if cfg.item_tower == "c" and cfg.d_out != cfg.d_llm:
            raise ValueError(
                f"item tower 'c' uses raw content vectors as item embeddings, so model.d_out must equal "
                f"the encoder dim ({cfg.d_llm}); got d_out={cfg.d_out}"
            )
        self.cfg = cfg
        content = content.float()
        # Frozen encoders' vectors share a large common direction; removing the catalog mean and
        # rescaling to unit average norm keeps items apart at the start of training.
        if cfg.center_inputs:
            mean = content.mean(0, keepdim=True)
            centred = content - mean
            scale = centred.norm(dim=1).mean().clamp_min(1e-8)
        else:
            mean = torch.zeros(1, content.shape[1])
            scale = torch.tensor(1.0)
        self.register_buffer("content_mean", mean)
        self.register_buffer("content_scale", scale.reshape(()))
        for view in cfg.input_views:  # whitening matrices, fitted once on this catalog (buffers: exported)
            if view != "center":
                groups = cfg.whiten_groups if view == "group" else 1
                self.register_buffer(f"{view}_matrix", whitening_matrix(content, mean, cfg.whiten_shrinkage, groups))
        if not padded:
            full = torch.cat([torch.zeros(1, content.shape[1]), content], 0)
        self.register_buffer("content", full, persistent=False)
        if cfg.num_id_items:
            if cfg.num_id_items != content.shape[0] or id_known is None or id_known.shape != (content.shape[0],):
                raise ValueError(f"item ID embeddings need num_id_items = catalog size ({content.shape[0]}) and "
                                 f"id_known [{content.shape[0]}] bool")
            self.register_buffer("id_known", torch.cat([torch.zeros(1, dtype=torch.bool), id_known.bool()]))
        if cfg.id_members and not (cfg.num_id_items and 0 < cfg.id_members < cfg.members):
            raise ValueError(f"model.id_members ({cfg.id_members}) needs item ID embeddings and must be in "
                             f"1..model.members-1 ({cfg.members - 1}); 0 gives every member ID vectors")
        with_ids = set(id_member_indices(cfg))
        self.stacks = nn.ModuleList(Stack(cfg, m in with_ids) for m in range(cfg.members))  # the ensemble's members
        # members whose training has ended (learn.train.fit): skipped while training, kept in evaluation
        self.frozen_members: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, m: ModelConfig, content: np.ndarray | torch.Tensor,
                    train_popularity: np.ndarray | None = None, train=None,
                    max_history: int | None = None) -> "TwinTowers":
        """The towers ``model.*`` describes over ``content`` [num_items, d_llm]. With
        ``model.item_id_embedding`` the items with ``train_popularity`` > 0 get an ID embedding;
        ``model.positions=auto`` is decided from the ``train`` sequences and ``max_history``."""
        if m.positions == "auto":
            if train is None or max_history is None:
                raise ValueError("model.positions=auto is decided from the training sequences: pass train= and "
                                 "max_history=")
            m = resolve_positions(m, train, max_history)[0]
        content = torch.as_tensor(np.asarray(content, dtype=np.float32))
        if m.item_id_embedding and train_popularity is None:
            raise ValueError("model.item_id_embedding needs the training split's item popularity")
        known = torch.as_tensor(np.asarray(train_popularity) > 0) if m.item_id_embedding else None
        tcfg = TowerConfig.from_model_config(m, content.shape[1], len(content) if m.item_id_embedding else 0)
        return cls(tcfg, content, id_known=known)

    @property
    def num_items(self) -> int:
        return self.content.shape[0] - 1

    def center_vectors(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Raw content vectors [..., d_llm] -> centred, rescaled inputs; ``valid`` ([...] bool,
        True = real item) zeroes padding positions exactly."""
        x = (x.float() - self.content_mean) / self.content_scale
        if valid is not None:
            x = x * valid.unsqueeze(-1).to(x.dtype)  # padding stays exactly zero
        return x

    def _inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.center_vectors(self.content[tokens], tokens > 0)

    def input_views(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Raw content vectors [..., d_llm] -> one conditioned tensor per ``cfg.input_views`` (padding
        positions exactly zero): what the members' adaptors read."""
        out = []
        for view in self.cfg.input_views:
            if view == "center":
                out.append(self.center_vectors(x, valid))
                continue
            y = (x.float() - self.content_mean) @ getattr(self, f"{view}_matrix")
            out.append(y if valid is None else y * valid.unsqueeze(-1).to(y.dtype))
        return out

    def encode_vectors(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, self_only: bool = False, user: bool = False,
        tokens: torch.Tensor | None = None, id_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, L, d_llm] raw content vectors (right-padded) -> [B, L, d_out] normalised outputs.

        ``valid`` [B, L] bool marks real positions (None: all real); padding enters the stack as
        zeros. Causal attention; ``self_only`` makes each position attend to itself only (variant b);
        ``user`` applies the user head (the item head unless ``user_head=separate``). With item ID
        embeddings (``cfg.num_id_items``) either ``tokens`` [B, L] (the items' tokens: training) or
        ``id_vectors`` [B, L, members x d_model] (:meth:`id_vectors` rows, zeros for an item without
        one: the exported towers) give each position its ID vector.
        """
        L = x.shape[1]
        inputs = self.input_views(x, valid)
        ids: list[torch.Tensor | None] = [None] * len(self.stacks)
        if self.cfg.num_id_items:
            with_ids = id_member_indices(self.cfg)
            if id_vectors is not None:
                for m, part in zip(with_ids, id_vectors.float().chunk(len(with_ids), dim=-1)):
                    ids[m] = part
            elif tokens is not None:
                keep = self.id_known[tokens]
                if self.training and self.cfg.item_id_dropout > 0:
                    keep = keep & (torch.rand(tokens.shape, device=tokens.device) >= self.cfg.item_id_dropout)
                known = torch.where(keep, tokens, torch.zeros_like(tokens))
                for m in with_ids:
                    ids[m] = self.stacks[m].id_embedding(known)
            else:
                raise ValueError("this model adds item ID embeddings: it needs the items' tokens or ID vectors")
        if self.cfg.positions == "learned" and L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds model.max_len={self.cfg.max_len}")
        if self_only:
            mask = ~torch.eye(L, dtype=torch.bool, device=x.device)
        else:
            mask = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=1)
        skip = self.frozen_members if self.training else frozenset()
        width = self.cfg.d_out // len(self.stacks)
        outs = [x.new_zeros(*x.shape[:-1], width) if m in skip else stack(inputs, member_ids, mask, self_only, user)
                for m, (stack, member_ids) in enumerate(zip(self.stacks, ids))]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1) / len(outs) ** 0.5

    def sparse_id_gradients(self, on: bool) -> None:
        """Whether the item ID tables' gradients are sparse (the default: a step updates only the rows it
        touches, learn/train/optim.py) or dense (AdamW over every row: the baseline bench/step_time.py
        times against)."""
        for stack in self.stacks:
            if stack.id_embedding is not None:
                stack.id_embedding.sparse = on

    def member_groups(self) -> list[list[int]]:
        """The members that train and early-stop together: one group, or with ``id_members`` the content-only
        members and the members with ID vectors (in that order)."""
        with_ids = id_member_indices(self.cfg) if self.cfg.num_id_items else []
        if not with_ids or len(with_ids) == len(self.stacks):
            return [list(range(len(self.stacks)))]
        return [[m for m in range(len(self.stacks)) if m not in with_ids], with_ids]

    def encode_sequence(self, tokens: torch.Tensor, self_only: bool = False, user: bool = False) -> torch.Tensor:
        """[B, L] tokens (0 = pad, right-padded) -> [B, L, d_out]: ``encode_vectors`` on their content."""
        return self.encode_vectors(self.content[tokens], tokens > 0, self_only=self_only, user=user, tokens=tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """User-side outputs at every position of [B, L] histories (what DDP wraps)."""
        return self.encode_sequence(tokens, user=True)

    def user_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] right-padded histories -> [B, d_out] output at each row's last real position."""
        out = self.encode_sequence(tokens, user=True)
        lengths = (tokens > 0).sum(1)
        if (lengths == 0).any():
            raise ValueError("a history is empty: every user needs at least one item")
        return out[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]

    @property
    def id_width(self) -> int:
        """Width of one item's ID vector (the ID members' side by side; 0 without item ID embeddings)."""
        return id_width(self.cfg)

    @torch.no_grad()
    def id_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """[M] catalog indices -> [M, ID members x d_model]: each ID member's learned ID vector side by side,
        zeros for items unseen in training (what the exported towers take beside content vectors)."""
        if not self.cfg.num_id_items:
            raise ValueError("these towers have no item ID embeddings (model.item_id_embedding=false)")
        tokens = items + 1
        seen = self.id_known[tokens]
        known = torch.where(seen, tokens, torch.zeros_like(tokens))
        vectors = [self.stacks[m].id_embedding(known) for m in id_member_indices(self.cfg)]
        return torch.cat(vectors, -1) * seen.unsqueeze(-1)

    def item_embedding(self, items: torch.Tensor) -> torch.Tensor:
        """[M] catalog indices -> [M, d_out]: the stack on each item alone (length-1 sequence)."""
        tokens = (items + 1).unsqueeze(1)
        if self.cfg.item_tower == "c":
            return F.normalize(self._inputs(tokens)[:, 0], dim=-1)
        return self.encode_sequence(tokens)[:, 0]

    def target_sequence_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Item-side vectors for a target sequence during training: variant a attends causally over
        the targets, b each target alone, c raw content."""
        if self.cfg.item_tower == "a":
            return self.encode_sequence(tokens)
        if self.cfg.item_tower == "b":
            # each target alone, exactly as served (also with learned positions: all at position 0)
            B, L = tokens.shape
            return self.encode_sequence(tokens.reshape(-1, 1)).view(B, L, -1)
        return F.normalize(self._inputs(tokens), dim=-1)

    @torch.no_grad()
    def all_item_embeddings(self, batch_size: int = 4096) -> torch.Tensor:
        was_training = self.training
        self.eval()
        out = [
            self.item_embedding(torch.arange(s, min(s + batch_size, self.num_items), device=self.content.device))
            for s in range(0, self.num_items, batch_size)
        ]
        self.train(was_training)
        return torch.cat(out)


class Stack(nn.Module):
    """One member: adaptor, optional positions and ID embedding, input norm and dropout, the causal
    post-LN transformer and the output head(s); outputs are L2-normalised, d_out / members wide."""

    def __init__(self, cfg: TowerConfig, with_ids: bool = False):
        super().__init__()
        width = cfg.d_out // cfg.members
        self.adaptor = make_adaptor(cfg)  # the first input view's
        # one adaptor per further input view, outputs summed (absent with one view: the same weights
        # and state-dict keys as before views existed)
        self.view_adaptors = nn.ModuleList(make_adaptor(cfg) for _ in cfg.input_views[1:]) or None
        self.positions = None
        if cfg.positions == "learned":
            # zeros: training starts from the position-free model (torch's N(0, 1) default would swamp the
            # adaptor's outputs, whose entries are ~0.1, and the towers collapsed to one vector with it)
            self.positions = nn.Embedding(cfg.max_len, cfg.d_model)
            nn.init.zeros_(self.positions.weight)
        self.in_norm = nn.LayerNorm(cfg.d_model)
        self.in_drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(cfg.d_model, width)
        self.user_head = nn.Linear(cfg.d_model, width) if cfg.user_head == "separate" else None
        self.id_embedding = None
        if cfg.num_id_items and with_ids:  # learned ID vectors of the items seen in training (model.item_id_embedding)
            # sparse gradients: a step updates only the rows it touches (learn/train/optim.py)
            self.id_embedding = nn.Embedding(cfg.num_id_items + 1, cfg.d_model, padding_idx=0, sparse=True)
            nn.init.zeros_(self.id_embedding.weight)  # training starts from the content-only model

    def forward(self, inputs: list[torch.Tensor], ids: torch.Tensor | None, mask: torch.Tensor, self_only: bool,
                user: bool) -> torch.Tensor:
        """Conditioned inputs (one [B, L, d_llm] per input view) -> normalised [B, L, d_out / members];
        ``ids``: this member's ID vectors [B, L, d_model] (None without item ID embeddings)."""
        h = self.adaptor(inputs[0])
        if self.view_adaptors is not None:
            for adaptor, view in zip(self.view_adaptors, inputs[1:]):
                h = h + adaptor(view)
        if ids is not None:  # this member's ID vectors [B, L, d_model] (the ID-embedding option)
            h = h + ids
        if self.positions is not None:
            h = h + self.positions(torch.arange(h.shape[1], device=h.device))
        h = self.in_drop(self.in_norm(h))
        # Sequences are right-padded, so under the causal (or self-only) mask a real position never
        # sees padding and no key-padding mask is needed; outputs at padded positions are unused.
        # The explicit causality hint avoids a data-dependent mask comparison (matters for export).
        h = self.encoder(h, mask=mask, is_causal=not self_only)
        head = self.user_head if (user and self.user_head is not None) else self.head
        return F.normalize(head(h), dim=-1)


def mean_history(train, max_history: int) -> float:
    """The mean number of earlier items a training target has, each capped at ``max_history`` (what the
    towers read in front of it): the k-th item of a sequence (k = 1, 2, ...; the first item is never a
    target) has min(k, max_history). ``train``: per-user sequences (a ``Ragged`` or a list of arrays);
    from the lengths only, O(users)."""
    lengths = train.lengths() if isinstance(train, Ragged) else np.fromiter((len(s) for s in train), np.int64)
    n = lengths.astype(np.float64)
    h = float(max_history)
    # sum_{k=0}^{n-1} min(k, h): the first min(n, h+1) items contribute 0 + 1 + ... , the rest h each
    head = np.minimum(n, h + 1)
    total = (head * (head - 1) / 2 + np.maximum(n - head, 0) * h).sum()
    targets = np.maximum(n - 1, 0).sum()
    return float(total / targets) if targets else 0.0


def resolve_positions(m: ModelConfig, train, max_history: int) -> tuple[ModelConfig, float]:
    """``model.*`` with ``positions=auto`` decided from the training sequences: ``learned`` when
    :func:`mean_history` is at least ``positions_min_history``, else ``none`` (any other value is kept).
    Returns the config and the mean history it was decided on. Measured (README, Results on MovieLens-100k;
    bench/positions_length.py): learned positions cost at ~4 earlier items (Scientific; MovieLens cut to 10
    ratings a user) and pay from ~9 up (MovieLens cut to 20 and 40, the whole of it at 33); the default
    threshold, 6, sits between."""
    mean = mean_history(train, max_history)
    if m.positions != "auto":
        return m, mean
    return replace(m, positions="learned" if mean >= m.positions_min_history else "none"), mean


def id_member_indices(cfg: TowerConfig) -> list[int]:
    """The members with item ID vectors: none without ID embeddings, the last ``id_members`` with them
    (every member when ``id_members`` is 0)."""
    if not cfg.num_id_items:
        return []
    return list(range(cfg.members - cfg.id_members, cfg.members)) if cfg.id_members else list(range(cfg.members))


def id_width(cfg: TowerConfig) -> int:
    """Width of one item's ID vector in a bundle: d_model per member with ID vectors."""
    return len(id_member_indices(cfg)) * cfg.d_model


def check_input_views(cfg: TowerConfig) -> None:
    problem = input_views_problem(cfg.input_views, cfg.center_inputs, cfg.item_tower)
    if problem:
        raise ValueError(problem)
    if "group" in cfg.input_views and (cfg.whiten_groups < 2 or cfg.d_llm % cfg.whiten_groups):
        raise ValueError(f"model.whiten_groups ({cfg.whiten_groups}) must be >= 2 and divide the encoder's "
                         f"dimension ({cfg.d_llm})")
    if cfg.adaptor not in ("linear", "mlp"):
        raise ValueError(f"model.adaptor must be 'linear' or 'mlp', got {cfg.adaptor!r}")


def make_adaptor(cfg: TowerConfig) -> nn.Module:
    if cfg.adaptor == "linear":
        return nn.Linear(cfg.d_llm, cfg.d_model)
    hidden = cfg.adaptor_hidden or 2 * cfg.d_model
    return nn.Sequential(nn.Linear(cfg.d_llm, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, cfg.d_model))


@torch.no_grad()
def whitening_matrix(content: torch.Tensor, mean: torch.Tensor, shrinkage: float, groups: int = 1,
                     block: int = 65536) -> torch.Tensor:
    """[d, d] ZCA whitening of ``content`` - ``mean`` (block-diagonal over ``groups`` contiguous blocks
    of dimensions), each block's covariance shrunk by ``shrinkage`` x its mean eigenvalue, scaled so the
    catalog's whitened vectors have unit mean norm. Streams over rows (float64 sums): memory O(d^2)."""
    n, d = content.shape
    cov = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, n, block):
        x = content[s : s + block].double() - mean.double()
        cov += x.T @ x
    cov /= max(1, n - 1)
    w = torch.zeros(d, d, dtype=torch.float64)
    size = d // groups
    for g in range(groups):
        sl = slice(g * size, (g + 1) * size)
        evals, evecs = torch.linalg.eigh(cov[sl, sl])
        evals = evals.clamp_min(0)
        w[sl, sl] = evecs @ torch.diag((evals + shrinkage * evals.mean()).clamp_min(1e-12).rsqrt()) @ evecs.T
    norm_sum = 0.0
    for s in range(0, n, block):
        norm_sum += float(((content[s : s + block].double() - mean.double()) @ w).norm(dim=1).sum())
    return (w / max(norm_sum / max(1, n), 1e-12)).float()


def member_slices(vectors: torch.Tensor, members: int) -> list[torch.Tensor]:
    """Split tower outputs [..., d_out] into the members' own unit vectors [..., d_out / members]
    (the inverse of the concatenation in ``encode_vectors``)."""
    if members == 1:
        return [vectors]
    return [chunk * members ** 0.5 for chunk in vectors.chunk(members, dim=-1)]


def pad_tails(histories, rows: np.ndarray, max_len: int) -> torch.Tensor:
    """``pad_histories`` of rows ``rows`` of a Ragged, vectorised (no Python loop per row)."""
    n = histories.lengths()[rows]
    L = max(1, min(max_len, int(n.max()) if len(n) else 1))
    tails, _ = histories.tails(rows, L, pad=-1)
    return torch.from_numpy(tails.astype(np.int64) + 1)


def pad_histories(histories: list, max_len: int) -> torch.Tensor:
    """Right-padded [B, L] token tensor (catalog index + 1; 0 = pad), keeping the last max_len items."""
    L = max(1, min(max_len, max(len(h) for h in histories)))
    out = torch.zeros(len(histories), L, dtype=torch.long)
    for i, h in enumerate(histories):
        h = h[-max_len:]
        if len(h):
            out[i, : len(h)] = torch.tensor(np.asarray(h), dtype=torch.long) + 1
    return out
