"""The SeerAttention patch that every evaluation script applies to its model."""

from __future__ import annotations

from torch import nn

from ..gate_config import GATE_FIELDS


def patch_model(model: nn.Module, gates: str | None = None, **config_fields) -> nn.Module:
    """Add SeerAttention to `model`: trained gates from the adapter folder `gates`, else untrained gates
    (enough for the oracle, pooled-score and streaming selectors, and for timing at a density)."""
    import seerattn_hf as sa

    if gates:
        # The trained gates fix their own shape (block size, ...): only policy fields apply.
        return sa.from_pretrained(gates, model=model,
                                  **{k: v for k, v in config_fields.items() if k not in GATE_FIELDS})
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(**config_fields))
    return model
