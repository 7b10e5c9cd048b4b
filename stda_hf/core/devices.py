"""Device choice, one rule for every stage: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` to a ``torch.device``."""

from __future__ import annotations

import torch

from stda_hf.core.errors import StdaError

DEVICE_HELP = "use auto, cpu, cuda or cuda:N"


def check_device_name(device: str) -> None:
    """Refuse a ``--device`` value that names no device (settings are checked before any work starts).

    Raises
    ------
    StdaError
        Naming the value and the valid forms.
    """
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise StdaError(f"unknown --device {device!r}; {DEVICE_HELP}") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The device a stage runs on.

    ``auto`` is this process's GPU when CUDA is available, else the CPU; ``cuda`` is this process's GPU,
    ``cuda:<local rank>``, so every process of a ``torchrun`` job gets its own; ``cpu`` and ``cuda:N`` are taken
    as given.

    Raises
    ------
    StdaError
        An unknown name, or CUDA asked for where there is none.
    """
    check_device_name(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StdaError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
