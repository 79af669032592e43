"""Which torch device a stage runs on: the same code on CPU and CUDA (docs/DESIGN.md 3.1)."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """ "auto" -> cuda when present, else cpu; "cpu" / "cuda" / "cuda:1" as given.

    Asking for CUDA on a machine without it is an error, not a silent fall-back to CPU,
    so a misconfigured site is noticed instead of running 50x slower.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev
