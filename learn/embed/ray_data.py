"""Embed a catalog with Ray Data: ``map_batches`` over a pool of encoder actors, streamed into the store.

    vectors, stats = embed_catalog_ray(cfg.embed, item_ids, texts, ContentStore(path))

Same contract as ``learn.embed.store.embed_catalog`` (the local path): float32 [n, d] vectors in
input order, and the same stats keys. Items whose (text hash, encoder id) is in the store are
reused and never sent to Ray; each distinct missing text is encoded once. The missing texts are
ordered longest first (characters, a cheap proxy for tokens) and cut into blocks of
``rows_per_call`` rows, so each actor call gets texts of similar length. Inside the call the
actor's encoder (``embed.backend``) does what it does locally: ``HFEncoder`` sorts by token length
again, ``VLLMEncoder`` leaves batching to vLLM; so the vectors match the local ones.

Each actor loads one encoder in ``__init__`` (``embed.num_gpus`` = ``gpus_per_actor`` per actor;
pool size ``num_actors``, or the cluster's GPUs / ``gpus_per_actor``, or 1). The driver consumes
the results with ``iter_batches`` as they stream in and appends them to the content store (one
part per write) every ``embed.rows_per_flush`` rows or ``embed.flush_seconds``, whichever comes
first, and once more when it stops on an error: a killed job re-run embeds only what is missing.
Actors that die are restarted by Ray and their tasks retried; a result that arrives twice (a
retried task) is kept once.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from learn.embed.store import ContentStore, StoreWriter, check_catalog, check_vectors, plan_embedding

log = logging.getLogger(__name__)

# Ray fault tolerance for the encoder actors: a dead actor is restarted (its model reloaded) and
# its unfinished calls re-run; bounded, so a batch that kills its actor every time fails the job.
MAX_ACTOR_RESTARTS = 8
MAX_TASK_RETRIES = 3
# rows per actor call, in encoder batches (the actor sorts these by token length)
CALL_BATCHES = 4


class EncoderActor:
    """``map_batches`` callable: one encoder per actor (``embed.backend``), {gid, text} -> {gid, embedding}."""

    def __init__(self, embed_cfg: Any, expected_encoder_id: str, device: str = "cpu", threads: int = 0) -> None:
        import torch

        from learn.embed.backends import build_encoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = build_encoder(embed_cfg, device=device)
        if self.encoder.encoder_id != expected_encoder_id:
            raise RuntimeError(f"actor encoder is '{self.encoder.encoder_id}', the driver expected "
                               f"'{expected_encoder_id}' (different package versions on this node?)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.encoder.encode([str(t) for t in batch["text"]], progress=False)
        return {"gid": np.asarray(batch["gid"], dtype=np.int64), "embedding": vectors}

    def __del__(self) -> None:
        # the vLLM backend holds an engine in a child process; it also ends on its own when this actor dies
        from learn.embed.backends import close_encoder

        try:
            close_encoder(self.encoder)
        except Exception:
            pass


def _check_cfg(embed_cfg: Any) -> None:
    if embed_cfg.num_actors < 0:
        raise ValueError(f"embed.num_actors must be >= 0 (0 = automatic), got {embed_cfg.num_actors}")
    if embed_cfg.gpus_per_actor < 0 or embed_cfg.cpus_per_actor < 0:
        raise ValueError(f"embed.gpus_per_actor and embed.cpus_per_actor must be >= 0, got "
                         f"{embed_cfg.gpus_per_actor} and {embed_cfg.cpus_per_actor}")
    if embed_cfg.rows_per_flush <= 0 or not embed_cfg.flush_seconds >= 0:
        raise ValueError(f"embed.rows_per_flush must be > 0 and embed.flush_seconds >= 0, got "
                         f"{embed_cfg.rows_per_flush} and {embed_cfg.flush_seconds}")


def _model_dim(resolved: Any) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved.path, revision=resolved.revision if resolved.kind == "hub" else None)
    return int(config.hidden_size)


def pool_size(embed_cfg: Any, n_calls: int) -> int:
    """Actors to start: ``num_actors``, else the cluster's GPUs / ``gpus_per_actor``, else 1; at most ``n_calls``."""
    import ray

    if embed_cfg.num_actors > 0:
        n = int(embed_cfg.num_actors)
    elif embed_cfg.gpus_per_actor > 0:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        if gpus < embed_cfg.gpus_per_actor:
            raise RuntimeError(f"embed.gpus_per_actor={embed_cfg.gpus_per_actor} but the Ray cluster has {gpus:g} "
                               f"GPUs; set embed.gpus_per_actor=0 to embed on CPUs")
        n = int(gpus // embed_cfg.gpus_per_actor)
    else:
        n = 1
    n = max(1, min(n, n_calls))
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if n * embed_cfg.cpus_per_actor > cpus:
        log.warning("%d actors x %g CPUs exceed the cluster's %g CPUs: the pool waits for the cluster to grow",
                    n, embed_cfg.cpus_per_actor, cpus)
    return n


@contextlib.contextmanager
def _ray_progress(enabled: bool) -> Iterator[None]:
    """Ray Data's own progress bars on or off while datasets are built here (they snapshot the context)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = enabled
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved


def embed_catalog_ray(embed_cfg: Any, item_ids: Sequence[Any], texts: Sequence[str], store: ContentStore,
                      progress: bool = True, *, rows_per_call: int | None = None,
                      actor_cls: type = EncoderActor) -> tuple[np.ndarray, dict[str, Any]]:
    """Content vectors for a catalog, [n, d] float32 in input order, plus stats (as ``embed_catalog``).

    ``embed_cfg`` is an ``EmbedConfig``. Starts Ray (``ray.init()``: joins $RAY_ADDRESS, else a local
    instance) if it is not running in this process.
    ``rows_per_call``: texts per actor call (default ``CALL_BATCHES * embed.batch_size``).
    ``actor_cls``: the ``map_batches`` class (an ``EncoderActor`` subclass; tests inject faults with it).

    stats: items_total, items_reused, items_embedded, texts_encoded, embed_seconds.
    """
    import pyarrow as pa
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from learn.embed.models import configured_encoder

    _check_cfg(embed_cfg)
    ids, texts, hashes = check_catalog(item_ids, texts, "embed_catalog_ray")
    rows_per_call = int(rows_per_call or CALL_BATCHES * embed_cfg.batch_size)
    if rows_per_call <= 0:
        raise ValueError(f"rows_per_call must be > 0, got {rows_per_call}")
    resolved, eid = configured_encoder(embed_cfg)
    dim = _model_dim(resolved)

    # one row per distinct missing text; gid indexes ``groups`` (the items sharing that text)
    out, groups, stats = plan_embedding(store, ids, hashes, eid, dim)
    if not groups:
        return out, stats

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    n_calls = -(-len(groups) // rows_per_call)
    n_actors = pool_size(embed_cfg, n_calls)
    n_todo = sum(len(g) for g in groups)
    log.info("embedding %d items (%d distinct texts) with %s on %d Ray actors; %d reused from %s",
             n_todo, len(groups), eid, n_actors, stats["items_reused"], store.path)

    # longest texts first: similar lengths share a call, and a call too big for memory fails at once
    order = np.argsort([-len(texts[g[0]]) for g in groups], kind="stable").astype(np.int64)
    blocks = [pa.table({"gid": pa.array(order[s:s + rows_per_call], type=pa.int64()),
                        "text": pa.array([texts[groups[g][0]] for g in order[s:s + rows_per_call]], type=pa.string())})
              for s in range(0, len(order), rows_per_call)]
    gpus = float(embed_cfg.gpus_per_actor)
    device = "cuda" if gpus > 0 else "cpu"
    threads = max(1, int(embed_cfg.cpus_per_actor)) if device == "cpu" else 0
    with _ray_progress(progress), warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args (removal planned for 2.64) but has no named parameter
        # for actor fault tolerance yet; its defaults would be unbounded restarts and retries
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_arrow(blocks).map_batches(
            actor_cls, fn_constructor_args=(embed_cfg, eid, device, threads), batch_size=rows_per_call,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=embed_cfg.cpus_per_actor, num_gpus=gpus if gpus > 0 else None,
            max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
        )
    del blocks

    done = np.zeros(len(groups), dtype=bool)
    writer = StoreWriter(store, ids, hashes, eid, out, stats, flush_rows=embed_cfg.rows_per_flush,
                         flush_seconds=embed_cfg.flush_seconds)
    bar = tqdm(total=n_todo, unit="item", desc="content store (ray)", disable=not progress)
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        with writer.saving():  # keeps what arrived if the job stops, so a re-run does not encode it again
            for batch in batches:
                gids, vecs = np.asarray(batch["gid"]), np.asarray(batch["embedding"], dtype=np.float32)
                check_vectors(vecs, len(gids), dim, "encoder actor")
                received = 0
                for g, v in zip(gids.tolist(), vecs):
                    if done[g]:
                        continue  # a retried call delivered this text again
                    done[g] = True
                    out[groups[g]] = v
                    writer.add(groups[g])
                    received += len(groups[g])
                    stats["texts_encoded"] += 1
                bar.update(received)
                writer.maybe_flush()
            writer.flush()
            if not done.all():
                raise RuntimeError(f"Ray Data returned {int(done.sum())} of {len(groups)} texts; "
                                   f"re-run to embed the rest")
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        bar.close()
        stats["embed_seconds"] = round(time.perf_counter() - start, 3)
    return out, stats
