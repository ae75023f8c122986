"""Train SeerAttention gates by self-distillation; a thin wrapper over `seerattn_hf.training.cli.main`.

    accelerate launch scripts/train_gates.py --config configs/smollm2-135m.yaml [--key value ...]
"""

from seerattn_hf.training.cli import main

if __name__ == "__main__":
    main()
