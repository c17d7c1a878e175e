"""vLLM's pooling (embedding) mode as an item-content encoder, run in a child process.

    enc = VLLMEncoder("smollm2", max_tokens=256)    # same arguments as HFEncoder
    vecs = enc.encode(texts)                          # float32 [n, enc.dim], unit rows
    enc.close()                                       # shuts the engine down, ends the child

The vectors are the ones ``HFEncoder`` makes for the same model: mean of the last hidden layer
over each text's tokens, L2-normalised, text truncated to ``max_tokens`` tokens. To make the
inputs identical, this process tokenizes with the model's HF tokenizer exactly as ``HFEncoder``
does (special tokens, truncation) and hands vLLM token ids, so vLLM's own prompt handling and
truncation rules, which change between releases, never come into it. Both encoders share one
``encoder_id``: their vectors are interchangeable in the content store (tests hold them to a
cosine of at least 0.99 per item; measured ~1 - 1e-7 in float32).

Why a child process: vLLM starts its engine in further processes, wants a ``__main__`` guard, and
on the CPU build the interpreter can abort while exiting after the work is done. The engine lives
in ``python -m learn.embed.vllm_encoder`` (the interpreter ``python``: this one by default, or
another environment that has vLLM, e.g. ``.venv-vllm/bin/python``), which talks to this process
over its stdin/stdout pipes. ``close()`` asks it to shut the engine down and leaves with
``os._exit``; if it does not stop in time its process tree is killed. The child also stops when
this process dies (its stdin reaches end of file). vLLM's logs go to a file whose last lines are
quoted in any error.

vLLM API differences live in one function, ``engine_kwargs``: ``runner="pooling"`` (current) or
``task="embed"`` (older releases), ``pooler_config`` or ``override_pooler_config``, and the
normalise flag (``use_activation`` now, ``normalize`` before).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

# protocol: each message is an 8-byte little-endian length, then a pickle of a tuple
_HEADER = struct.Struct("<Q")
CHUNK = 256  # texts per request to the child (bounds message size, drives the progress bar)


def engine_kwargs(model_path: str, *, dtype: str, max_tokens: int, memory_fraction: float,
                  engine_fields: set[str], pooler_fields: set[str], seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` that give mean-pooled, L2-normalised last-layer vectors.

    ``engine_fields`` / ``pooler_fields``: the field names of the installed vLLM's ``EngineArgs``
    and ``PoolerConfig`` (``vllm_fields()``), so one code path fits old and new releases.
    """
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"embed.vllm_memory_fraction must be in (0, 1], got {memory_fraction}")
    kw: dict[str, Any] = {"model": model_path, "dtype": dtype, "max_model_len": int(max_tokens), "seed": seed,
                          # the fraction of GPU memory (of RAM on the CPU build) vLLM may take
                          "gpu_memory_utilization": float(memory_fraction),
                          # no CUDA graph capture / compilation: a one-off batch job, start time matters
                          "enforce_eager": True}
    if "runner" in engine_fields:
        kw["runner"] = "pooling"
    elif "task" in engine_fields:
        kw["task"] = "embed"
    else:
        raise RuntimeError("this vLLM has neither EngineArgs.runner nor EngineArgs.task; cannot ask for "
                           "pooling (embedding) mode")
    pooler: dict[str, Any] = {"pooling_type": "MEAN"}
    if "use_activation" in pooler_fields:
        pooler["use_activation"] = True  # for embedding poolers: L2 normalisation
    elif "normalize" in pooler_fields:
        pooler["normalize"] = True
    else:
        raise RuntimeError("this vLLM's PoolerConfig has neither use_activation nor normalize")
    if "pooler_config" in engine_fields:
        kw["pooler_config"] = pooler
    elif "override_pooler_config" in engine_fields:
        kw["override_pooler_config"] = pooler
    else:
        raise RuntimeError("this vLLM has neither EngineArgs.pooler_config nor override_pooler_config")
    return kw


def vllm_fields() -> tuple[set[str], set[str]]:
    """Field names of the installed vLLM's ``EngineArgs`` and ``PoolerConfig``."""
    from vllm.engine.arg_utils import EngineArgs

    try:
        from vllm.config import PoolerConfig
    except ImportError:  # some releases keep it in vllm.config.pooler only
        from vllm.config.pooler import PoolerConfig
    return ({f.name for f in dataclasses.fields(EngineArgs)}, {f.name for f in dataclasses.fields(PoolerConfig)})


# ---------------------------------------------------------------- framing (both sides)

def send(stream: IO[bytes], message: tuple) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while len(data):  # an unbuffered pipe may take part of it per call
        n = stream.write(data)
        data = data[n if n is not None else len(data):]
    stream.flush()


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            raise EOFError(f"pipe closed after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def receive(stream: IO[bytes]) -> tuple:
    (n,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, n))


# ---------------------------------------------------------------- the child (has vLLM)

class _Engine:
    """The vLLM engine in the child: token ids in, unit vectors out."""

    def __init__(self, model_path: str, dtype: str, max_tokens: int, memory_fraction: float) -> None:
        import vllm

        engine_fields, pooler_fields = vllm_fields()
        self.kwargs = engine_kwargs(model_path, dtype=dtype, max_tokens=max_tokens, memory_fraction=memory_fraction,
                                    engine_fields=engine_fields, pooler_fields=pooler_fields)
        self.llm = vllm.LLM(**self.kwargs)
        self.version = getattr(vllm, "__version__", "unknown")
        probe = self.embed([[0, 1]])  # also tells the output size
        self.dim = int(probe.shape[1])

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        outputs = self.llm.embed([{"prompt_token_ids": list(map(int, ids))} for ids in token_ids], use_tqdm=False)
        vecs = np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outputs])
        # the pooler normalises already; again here so a release that does not still gives unit rows
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return (vecs / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def _end_group(code: int) -> None:
    """Kill this process's group (it and the engine processes vLLM started), then exit."""
    sys.stderr.flush()
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(code)


def _watch_parent(parent: int) -> None:
    """End everything when the parent dies mid-call (e.g. a Ray actor killed with SIGKILL)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            print("learn vLLM worker: parent process is gone; stopping", file=sys.stderr)
            _end_group(1)


def serve(argv: Sequence[str] | None = None) -> None:
    """Child main loop: ("encode", token ids) -> ("ok", vectors); ("close",) -> ("closed",), exit.

    The worker makes its own process group, so that on exit (a close, an error, or its parent
    gone) it can take down every process vLLM started, not only itself."""
    ap = argparse.ArgumentParser(description="learn's vLLM embedding worker (started by VLLMEncoder)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--memory-fraction", type=float, required=True)
    args = ap.parse_args(argv)
    parent = os.getppid()
    os.setpgrp()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    # the pipes are the protocol: take them over, then point fd 0/1 elsewhere so nothing vLLM (or the
    # processes it starts) prints or reads can corrupt them
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    code = 0
    engine = None
    try:
        try:
            engine = _Engine(args.model, args.dtype, args.max_tokens, args.memory_fraction)
        except Exception:
            send(proto_out, ("error", "vLLM engine failed to start:\n" + traceback.format_exc()))
            raise SystemExit(3)
        send(proto_out, ("ready", {"dim": engine.dim, "vllm": engine.version, "kwargs": engine.kwargs}))
        while True:
            try:
                message = receive(proto_in)
            except EOFError:  # the parent is gone
                break
            if message[0] == "close":
                engine.shutdown()
                engine = None
                send(proto_out, ("closed",))
                break
            if message[0] != "encode":
                send(proto_out, ("error", f"unknown request {message[0]!r}"))
                continue
            try:
                send(proto_out, ("ok", engine.embed(message[1])))
            except Exception:
                send(proto_out, ("error", traceback.format_exc()))
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                traceback.print_exc()
        # skip interpreter teardown (vLLM's CPU build can abort in its exit handlers) and leave no
        # engine process behind
        _end_group(code)


# ---------------------------------------------------------------- the driver side

class VLLMEncoder:
    """``HFEncoder``'s interface (encode, dim, encoder_id, max_tokens) over a vLLM engine in a child process.

    ``device`` is accepted for ``HFEncoder``'s signature only: vLLM runs on the GPUs the child sees
    (``CUDA_VISIBLE_DEVICES``, set per actor by Ray) and on the CPU with the CPU build.
    ``python``: the interpreter that has vLLM (default: this one). ``memory_fraction``: vLLM's
    ``gpu_memory_utilization`` (on the CPU build, the share of RAM it reserves).
    """

    pooling = "mean"

    def __init__(self, model_spec: Any, *, revision: str | None = None, max_tokens: int = 256, batch_size: int = 64,
                 dtype: str = "float32", cache_dir: str | Path = ".cache/learn", device: str = "cpu",
                 python: str | None = None, memory_fraction: float = 0.3, startup_timeout: float = 900.0,
                 request_timeout: float = 3600.0) -> None:
        from transformers import AutoTokenizer

        from learn.embed.models import ResolvedModel, encoder_id, resolve_model

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        self.resolved = (model_spec if isinstance(model_spec, ResolvedModel)
                         else resolve_model(model_spec, revision=revision, cache_dir=cache_dir))
        if self.resolved.kind == "hub":
            raise ValueError(f"the vLLM backend needs a local model directory; '{self.resolved.spec}' is a hub id. "
                             f"Download it first (huggingface-cli download) and set embed.model to the folder")
        self.max_tokens, self.batch_size, self.dtype = max_tokens, batch_size, dtype
        self.python = python or sys.executable
        self.request_timeout = request_timeout
        self.tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
        self.encoder_id = encoder_id(self.resolved, self.pooling, max_tokens, dtype)
        self._proc: subprocess.Popen | None = None
        self._log_path = Path(tempfile.mkstemp(prefix="learn-vllm-", suffix=".log")[1])
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        repo = str(Path(__file__).resolve().parents[2])  # so the child finds this package without installing it
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [self.python, "-m", "learn.embed.vllm_encoder", "--model", self.resolved.path, "--dtype", dtype,
               "--max-tokens", str(max_tokens), "--memory-fraction", str(memory_fraction)]
        with open(self._log_path, "wb") as log:
            try:
                # unbuffered pipes: select() must see every byte that has not been read yet
                self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                              bufsize=0)
            except OSError as exc:
                self._log_path.unlink(missing_ok=True)
                raise RuntimeError(f"cannot start the vLLM worker with '{self.python}': {exc}. Set "
                                   f"embed.vllm_python to an interpreter that has vLLM (make vllm-env "
                                   f"builds .venv-vllm)") from exc
        reply = self._receive(startup_timeout, "starting the vLLM engine")
        if reply[0] != "ready":
            self._fail(f"the vLLM worker did not start: {reply[1] if len(reply) > 1 else reply}")
        self.dim = int(reply[1]["dim"])
        self.vllm_version = reply[1]["vllm"]
        self.engine_kwargs = reply[1]["kwargs"]

    @classmethod
    def from_config(cls, cfg: Any, device: str = "cpu") -> "VLLMEncoder":
        """Build from an ``EmbedConfig``."""
        return cls(cfg.model, revision=cfg.revision, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                   dtype=cfg.dtype, cache_dir=cfg.cache_dir, device=device, python=cfg.vllm_python,
                   memory_fraction=cfg.vllm_memory_fraction)

    def __repr__(self) -> str:
        return f"VLLMEncoder({self.encoder_id!r}, dim={getattr(self, 'dim', '?')}, python={self.python!r})"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text exactly as ``HFEncoder.tokenize``: special tokens, truncated to ``max_tokens``."""
        from learn.embed.hf import tokenize

        return tokenize(self.tokenizer, texts, self.max_tokens)

    def encode(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """float32 [len(texts), dim] unit vectors, in input order."""
        from tqdm.auto import tqdm

        from learn.embed.hf import check_texts

        texts = check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with tqdm(total=len(texts), unit="item", desc="embed (vllm)", disable=not progress, leave=False) as bar:
            for start in range(0, len(texts), CHUNK):
                ids = self.tokenize(texts[start:start + CHUNK])
                if self._proc is None:
                    raise RuntimeError("this VLLMEncoder is closed")
                send(self._proc.stdin, ("encode", ids))
                reply = self._receive(self.request_timeout, f"embedding texts {start}..{start + len(ids) - 1}")
                if reply[0] != "ok":
                    self._fail(f"vLLM failed on texts {start}..{start + len(ids) - 1}: {reply[1]}")
                vecs = reply[1]
                if vecs.shape != (len(ids), self.dim):
                    self._fail(f"vLLM returned {vecs.shape} for {len(ids)} texts, expected ({len(ids)}, {self.dim})")
                out[start:start + len(ids)] = vecs
                bar.update(len(ids))
        return out

    def _receive(self, timeout: float, doing: str) -> tuple:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            self._fail(f"no answer from the vLLM worker after {timeout:.0f} s while {doing}")
        try:
            return receive(proc.stdout)
        except EOFError:
            code = proc.wait(timeout=30)
            self._fail(f"the vLLM worker exited (code {code}) while {doing}")

    def _log_tail(self, lines: int = 25) -> str:
        try:
            text = self._log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _fail(self, why: str):
        self._kill()
        raise RuntimeError(f"{why}\n--- last lines of the vLLM log {self._log_path} ---\n{self._log_tail()}")

    def _kill(self) -> None:
        """Kill the worker and every process of its group (vLLM's engine), whether or not it still runs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        import psutil

        try:
            tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        except psutil.NoSuchProcess:
            tree = []
        for p in [proc, *tree]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker leads its own group (see serve)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)

    def close(self, timeout: float = 120.0) -> None:
        """Shut the engine down and end the child (killed, with its processes, if it does not stop in time)."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                send(proc.stdin, ("close",))
                self._receive(timeout, "shutting down")
                proc.wait(timeout=timeout)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            pass
        finally:
            self._kill()
            self._proc = None
        try:
            self._log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "VLLMEncoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close(timeout=10.0)
        except Exception:
            pass


if __name__ == "__main__":
    serve()
