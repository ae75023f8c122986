"""seerattn_hf: learned block-sparse attention (SeerAttention) for Hugging Face Transformers models.

Importing the package needs neither a GPU nor triton: the Triton kernels load on first use.
"""

from .adapter import convert_published_gates, from_pretrained, load_gate_weights, push_gates_to_hub, save_gates
from .calibration import calibrate_thresholds
from .config import SeerAttentionConfig
from .decode_gate import DecodeGateConfig
from .gate_config import GateConfig
from .growable_cache import GrowableCache
from .patching import (
    SUPPORTED_MODEL_TYPES,
    apply_seer_attention,
    gate_parameters,
    get_sparsity_stats,
    pop_distill_records,
    remove_seer_attention,
    reset_sparsity_stats,
    set_attention_mode,
    update_sparsity_config,
)
from .policy import SparsityPolicy
from .version import __version__

__all__ = [
    "DecodeGateConfig",
    "GateConfig",
    "GrowableCache",
    "SUPPORTED_MODEL_TYPES",
    "SeerAttentionConfig",
    "SparsityPolicy",
    "__version__",
    "apply_seer_attention",
    "calibrate_thresholds",
    "convert_published_gates",
    "from_pretrained",
    "gate_parameters",
    "get_sparsity_stats",
    "load_gate_weights",
    "pop_distill_records",
    "push_gates_to_hub",
    "remove_seer_attention",
    "reset_sparsity_stats",
    "save_gates",
    "set_attention_mode",
    "update_sparsity_config",
]
