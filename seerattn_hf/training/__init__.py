"""Self-distillation training of SeerAttention gates (Accelerate), with its data pipeline and metrics.

Entry points: `seerattn-train` (console script) and `scripts/train_gates.py`, both `cli.main`.
"""

from .arguments import Arguments, parse_arguments
from .metrics import GateQuality, block_recall, distillation_loss, layer_kl
from .trainer import Trainer, train

__all__ = ["Arguments", "GateQuality", "Trainer", "block_recall", "distillation_loss", "layer_kl",
           "parse_arguments", "train"]
