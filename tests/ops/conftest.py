"""Kernel-test setup: Triton's interpreter when there is no GPU, and NaN-filled `torch.empty`.
Helpers (mask lists, the float64 dense reference, relative RMS error) live in attn_testing.py."""

from __future__ import annotations

import pytest
import torch

# TRITON_INTERPRET is set by the root tests/conftest.py (it must precede any import of triton).


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
