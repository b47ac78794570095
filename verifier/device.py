"""Choosing the torch device from `--device auto|cpu|cuda`."""

from __future__ import annotations

import torch

from verifier.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is an error."""
    if name not in DEVICE_CHOICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
