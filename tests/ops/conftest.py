"""Kernel-test setup: Triton's interpreter when there is no GPU, and NaN-filled `torch.empty`.
Helpers (mask lists, the float64 dense reference, relative RMS error) live in attn_testing.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of the kernel modules (they are imported lazily, on first call)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors, so an output tile a kernel forgets to write
    fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(torch, "empty", empty)
