"""The torch device a ``*.device`` key names, and the autocast its ``train.precision`` asks for.

    device = resolve_device(cfg.train.device, "train.device")   # cpu | cuda | auto
    with autocast(device, cfg.train.precision):                 # fp32: no-op; bf16: bfloat16 autocast
        loss = ...
"""

from __future__ import annotations

import contextlib

import torch

from learn.config import ConfigError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(choice: str, key: str) -> torch.device:
    """``auto`` is cuda when torch sees a CUDA device, else cpu; ``cuda`` without one is a ConfigError naming ``key``."""
    if choice not in DEVICES:
        raise ConfigError(f"key '{key}' must be one of {list(DEVICES)}, got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "auto":
        return torch.device("cpu")
    raise ConfigError(f"{key}=cuda but torch sees no CUDA device (torch {torch.__version__}, CUDA build "
                      f"{torch.version.cuda or 'none'}): set {key}=cpu or {key}=auto")


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast on ``device`` for precision ``bf16``; a no-op context for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ConfigError(f"key 'train.precision' must be one of ['fp32', 'bf16'], got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
