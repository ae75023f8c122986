import subprocess
import sys

# Runs a tiny patched model with `triton` made unimportable: the package must not need it off-GPU.
WITHOUT_TRITON = """
import importlib.abc, sys
class BlockTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is blocked in this test")
sys.meta_path.insert(0, BlockTriton())
import torch, seerattn_hf as sa
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.5))
model(torch.randint(0, 64, (1, 40)))
print(sa.get_sparsity_stats(model)["density"] < 1.0,
      sorted(m for m in sys.modules if m.startswith("seerattn_hf.ops") and m.endswith(("triton", "flex"))))
"""


def test_package_runs_without_triton_and_loads_no_kernel_module():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True []"


def test_public_api_names():
    import seerattn_hf

    for name in ("SeerAttentionConfig", "apply_seer_attention", "remove_seer_attention", "save_gates",
                 "from_pretrained", "push_gates_to_hub", "get_sparsity_stats", "set_attention_mode"):
        assert callable(getattr(seerattn_hf, name)), name
    assert seerattn_hf.SUPPORTED_MODEL_TYPES == ("llama", "qwen2", "qwen3")
