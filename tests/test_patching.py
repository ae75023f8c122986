"""Patched models against the unpatched model, on tiny random Llama / Qwen2 / Qwen3 models."""

import itertools
import math

import pytest
import torch
from model_factory import TINY_ARCHITECTURES, tiny_model

import seerattn_hf as sa
from seerattn_hf.ops.block_sparse_attn import naive_block_sparse_attention

HEAD_LAYOUTS = [(4, 1), (4, 2), (4, 4)]  # GQA 4:1, 2:1 and MHA
LENGTHS = [9, 48, 61]  # shorter than a block, a multiple of the block size, a partial last block


def _logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("heads", HEAD_LAYOUTS, ids=lambda h: f"HQ{h[0]}-HKV{h[1]}")
@pytest.mark.parametrize("length", LENGTHS)
def test_dense_and_all_blocks_sparse_equal_unpatched(model_type, heads, length):
    model = tiny_model(model_type, num_heads=heads[0], num_kv_heads=heads[1])
    input_ids = torch.randint(0, 96, (2, length))
    reference = _logits(model, input_ids)

    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=1.0))
    sparse = _logits(model, input_ids)
    assert sa.get_sparsity_stats(model)["density"] == 1.0
    torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-5)

    sa.set_attention_mode(model, "dense")
    assert torch.equal(_logits(model, input_ids), reference)


def test_threshold_zero_keeps_every_block():
    model = tiny_model("llama")
    input_ids = torch.randint(0, 96, (1, 70))
    reference = _logits(model, input_ids)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="threshold", threshold=0.0))
    torch.testing.assert_close(_logits(model, input_ids), reference, rtol=1e-5, atol=1e-5)


class _RecordingAttention:
    """Wraps the sparse kernel to keep what each layer computed, for an independent check."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, block_idx, block_count, block_size, scale, seq_offsets, backend):
        self.calls.append((query, key, value, block_idx, block_count, block_size, scale))
        return naive_block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale=scale,
                                            seq_offsets=seq_offsets)


def _masked_dense_attention(query, key, value, block_idx, block_count, block_size, scale):
    """Dense float64 attention with a token mask expanded from the block lists."""
    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]
    blocks = block_idx.shape[2]
    block_mask = torch.zeros(batch, block_idx.shape[1], blocks, blocks, dtype=torch.bool)
    for b in range(batch):
        for h in range(block_idx.shape[1]):
            for i in range(blocks):
                block_mask[b, h, i, block_idx[b, h, i, : block_count[b, h, i]].long()] = True
    if block_mask.shape[1] != heads:
        block_mask = block_mask.repeat_interleave(groups, dim=1)
    token_mask = block_mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[..., :length, :length]
    token_mask &= torch.ones(length, length, dtype=torch.bool).tril()
    scores = query.double() @ key.double().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    probs = scores.masked_fill(~token_mask, float("-inf")).softmax(-1)
    return (probs @ value.double().repeat_interleave(groups, 1)).transpose(1, 2)


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("sharing", ["head", "kv_group"])
def test_sparse_equals_masked_dense_reference(model_type, sharing, monkeypatch):
    model = tiny_model(model_type, num_heads=4, num_kv_heads=2)
    input_ids = torch.randint(0, 96, (2, 75))
    config = sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.4, mask_sharing=sharing)
    sa.apply_seer_attention(model, config)
    recorder = _RecordingAttention()
    monkeypatch.setattr("seerattn_hf.attention.block_sparse_attention", recorder)
    sparse = _logits(model, input_ids)
    dense_reference = (sa.set_attention_mode(model, "dense"), _logits(model, input_ids))[1]

    assert len(recorder.calls) == model.config.num_hidden_layers
    expected_heads = 4 if sharing == "head" else 2
    for query, key, value, block_idx, block_count, block_size, scale in recorder.calls:
        assert block_idx.shape[1] == expected_heads
        assert (block_count < torch.arange(1, 6)).any(), "density 0.4 should drop some causal blocks"
        computed = naive_block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale=scale)
        expected = _masked_dense_attention(query, key, value, block_idx, block_count, block_size, scale)
        torch.testing.assert_close(computed.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse, dense_reference, atol=1e-3), "dropping blocks should change the logits"
    density = sa.get_sparsity_stats(model)["density"]
    assert 0.4 <= density < 1.0


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_generate_unchanged_at_full_density(model_type):
    model = tiny_model(model_type, num_heads=4, num_kv_heads=2)
    prompt = torch.randint(0, 96, (1, 37))
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=1.0))
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    assert sa.get_sparsity_stats(model)["density"] == 1.0


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_left_padded_batch_matches_unpadded_runs(model_type, density):
    model = tiny_model(model_type, num_heads=4, num_kv_heads=2)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=density))
    lengths = [70, 41, 12]
    sequences = [torch.randint(1, 96, (n,)) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = sequence
        attention_mask[row, width - len(sequence):] = 1
    padded = _logits(model, input_ids, attention_mask)
    for row, sequence in enumerate(sequences):
        alone = _logits(model, sequence[None])
        torch.testing.assert_close(padded[row, width - len(sequence):], alone[0], rtol=1e-4, atol=1e-4)


def test_padded_generate_matches_unpadded():
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=1)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.5))
    short, long = torch.randint(1, 96, (20,)), torch.randint(1, 96, (45,))
    input_ids = torch.stack([torch.cat([torch.zeros(25, dtype=torch.long), short]), long])
    attention_mask = (torch.arange(45)[None, :] >= torch.tensor([[25], [0]])).long()
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    for row, sequence in enumerate([short, long]):
        alone = model.generate(sequence[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[row, -6:], alone[0, -6:])


def test_right_padding_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16))
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, 30:] = 0
    with pytest.raises(ValueError, match="left padding"):
        _logits(model, torch.randint(0, 96, (2, 40)), attention_mask)


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_remove_restores_the_original_model(model_type):
    model = tiny_model(model_type)
    input_ids = torch.randint(0, 96, (1, 50))
    reference = _logits(model, input_ids)
    state_keys = set(model.state_dict())
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, density=0.3, sparsity_method="density"))
    assert set(model.state_dict()) > state_keys
    sa.remove_seer_attention(model)
    assert set(model.state_dict()) == state_keys
    assert model.config._attn_implementation == "sdpa"
    assert not any(module._forward_hooks for module in model.modules())
    assert torch.equal(_logits(model, input_ids), reference)


def test_eager_model_keeps_its_eager_dense_path():
    model = tiny_model("llama", attn_implementation="eager")
    input_ids = torch.randint(0, 96, (2, 33))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    reference = _logits(model, input_ids, attention_mask)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16))
    sa.set_attention_mode(model, "dense")
    assert torch.equal(_logits(model, input_ids, attention_mask), reference)
    sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, sparsity_method="density", density=1.0)
    sparse = _logits(model, input_ids, attention_mask)
    torch.testing.assert_close(sparse[:, 5:], reference[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[1], reference[1], rtol=1e-5, atol=1e-5)


def test_bf16_model_patches_and_runs():
    model = tiny_model("qwen3", dtype=torch.bfloat16)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.5))
    logits = _logits(model, torch.randint(0, 96, (1, 64)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 for p in sa.gate_parameters(model))


def test_layers_subset_and_stats_per_layer():
    model = tiny_model("llama", num_layers=3)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, layers=[0, 2], sparsity_method="density",
                                                         density=0.3))
    _logits(model, torch.randint(0, 96, (1, 96)))
    stats = sa.get_sparsity_stats(model)
    assert [entry["layer"] for entry in stats["per_layer"]] == [0, 2]
    # 6 blocks: each row keeps ceil(0.3 * (i + 1)) blocks -> 1+1+1+2+2+2 of 21 causal blocks.
    assert stats["density"] == pytest.approx(9 / 21)
    assert not hasattr(model.model.layers[1].self_attn, "seer_gate")
    sa.reset_sparsity_stats(model)
    assert sa.get_sparsity_stats(model)["density"] is None


def test_distill_mode_gives_dense_output_and_targets():
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2)
    input_ids = torch.randint(0, 96, (2, 50))
    reference = _logits(model, input_ids)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16))
    sa.set_attention_mode(model, "distill")
    logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    records = sa.pop_distill_records(model)
    assert [record.layer_idx for record in records] == [0, 1]
    for record in records:
        assert record.target.shape == record.gate_log_probs.shape == (2, 4, 4, 4)
        torch.testing.assert_close(record.target.sum(-1), torch.ones(2, 4, 4))
        torch.testing.assert_close(record.gate_log_probs.exp().sum(-1), torch.ones(2, 4, 4))
        assert record.gate_log_probs.requires_grad and not record.target.requires_grad
    loss = sum(-(r.target * r.gate_log_probs.clamp(min=-1e4)).sum() for r in records)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sa.gate_parameters(model))
    base = [p for n, p in model.named_parameters() if "seer_gate" not in n]
    assert all(p.grad is None for p in base)
    assert sa.pop_distill_records(model) == []


def _kept_mass(pooled, block_idx, block_count):
    kept = torch.zeros_like(pooled, dtype=torch.bool)
    for b, h, i in itertools.product(*map(range, block_count.shape)):
        kept[b, h, i, block_idx[b, h, i, : block_count[b, h, i]].long()] = True
    return (pooled * kept).sum(-1)


@pytest.mark.parametrize("better, worse, target, num_heads, length, density", [
    ("oracle", "streaming", "block_max", 2, 128, 0.25),
    # per-row top-k on the block mass keeps the most mass any selection of that budget can
    ("oracle_mass", "oracle", "block_mass", 4, 150, 0.3),
], ids=["oracle-vs-streaming", "oracle_mass-vs-oracle"])
def test_an_oracle_keeps_more_attention_mass_than_a_weaker_selection(monkeypatch, better, worse, target,
                                                                     num_heads, length, density):
    from seerattn_hf.ops.pooled_attn import naive_pooled_attention

    model = tiny_model("llama", num_heads=num_heads, num_kv_heads=2)
    input_ids = torch.randint(0, 96, (1, length))
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, selector="oracle",
                                                         sparsity_method="density", density=density))
    first_layer = {}
    for selector in (better, worse):
        recorder = _RecordingAttention()
        monkeypatch.setattr("seerattn_hf.attention.block_sparse_attention", recorder)
        sa.update_sparsity_config(model, selector=selector)
        _logits(model, input_ids)
        first_layer[selector] = recorder.calls[0]  # layer 0 sees the same q/k/v in both runs
    query, key, value, _, _, block_size, scale = first_layer[better]
    pooled = naive_pooled_attention(query, key, value, block_size, scale=scale, target=target)[1]
    better_mass = _kept_mass(pooled, *first_layer[better][3:5])
    worse_mass = _kept_mass(pooled, *first_layer[worse][3:5])
    assert torch.equal(first_layer[better][4], first_layer[worse][4]), "same budget per row"
    assert (better_mass >= worse_mass - 1e-6).all()
    assert better_mass.mean() > worse_mass.mean()


def test_errors_are_clear():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(ValueError, match=r"supports model_type \['llama', 'qwen2', 'qwen3'\]; found 'gpt2'"):
        sa.apply_seer_attention(gpt2)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no SeerAttention gates"):
        sa.remove_seer_attention(model)
    with pytest.raises(ValueError, match="2 layers"):
        sa.apply_seer_attention(model, sa.SeerAttentionConfig(layers=[5]))
    sa.apply_seer_attention(model)
    with pytest.raises(ValueError, match="already has SeerAttention gates"):
        sa.apply_seer_attention(model)
    with pytest.raises(ValueError, match="mode"):
        sa.set_attention_mode(model, "fast")
    with pytest.raises(ValueError, match="block_size"):
        sa.update_sparsity_config(model, block_size=32)
    with pytest.raises(ValueError, match="density"):
        sa.update_sparsity_config(model, density=1.5)
    # Cross-field rules are checked when the policy is built, before the model changes.
    with pytest.raises(ValueError, match="streaming"):
        sa.update_sparsity_config(model, selector="streaming", sparsity_method="threshold")
    assert model.seer_config.selector == "gate"
    with pytest.raises(AttributeError, match="immutable.*update_sparsity_config"):
        model.seer_config.density = 7
    with pytest.raises(ValueError, match="needs CUDA"):
        sa.update_sparsity_config(model, selector="gate", backend="triton")
        _logits(model, torch.randint(0, 96, (1, 70)))


def test_gate_rope_follows_the_model_rope_type():
    model = tiny_model("llama")
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 256}
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(gate_hidden_size=32))
    inv_freq = model.model.layers[0].self_attn.seer_gate.rope_inv_freq
    plain = 1.0 / (500000.0 ** (torch.arange(0, 32, 2).float() / 32))
    assert inv_freq.shape == (16,)
    assert inv_freq[0].item() == pytest.approx(plain[0].item())
    assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / 8.0, rel=1e-5), "llama3 scaling divides low frequencies"
    assert math.isclose(model.model.layers[0].self_attn.seer_gate.rope_scaling, 1.0)


def test_prompts_shorter_than_min_sparse_length_run_dense():
    model = tiny_model("llama")
    short, long = torch.randint(0, 96, (1, 40)), torch.randint(0, 96, (1, 70))
    reference = _logits(model, short)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.2,
                                                         min_sparse_length=64))
    assert torch.equal(_logits(model, short), reference)
    assert sa.get_sparsity_stats(model)["density"] is None
    _logits(model, long)
    assert sa.get_sparsity_stats(model)["density"] < 1.0


def test_update_replaces_the_policy_and_statistics_survive_any_change():
    model = tiny_model("llama")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.5))
    before = model.seer_config
    ids = torch.randint(0, 96, (1, 70))
    _logits(model, ids)
    kept_head = sa.get_sparsity_stats(model)["kept_blocks"]
    after = sa.update_sparsity_config(model, mask_sharing="kv_group")
    assert before.mask_sharing == "head" and after.mask_sharing == "kv_group" and after is model.seer_config
    states = [m.seer_state for m in model.modules() if hasattr(m, "seer_state")]
    assert all(state.policy is after.policy for state in states)
    _logits(model, ids)  # per-KV-head masks: counted per query head as before
    stats = sa.get_sparsity_stats(model)
    assert stats["causal_blocks"] == 2 * (stats["causal_blocks"] // 2) and stats["kept_blocks"] > kept_head
    assert 0.0 < stats["density"] <= 1.0


def _lora_model(model_type="llama"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # Random LoRA weights (not the identity init), so that the gates must see the adapted q and k.
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(tiny_model(model_type), config).eval()


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_a_peft_model_is_patched_through_its_base_model(model_type):
    peft_model = _lora_model(model_type)
    ids = torch.randint(0, 96, (1, 70))
    expected = _logits(peft_model, ids)
    assert sa.apply_seer_attention(peft_model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density",
                                                                      density=1.0)) is peft_model
    base = peft_model.get_base_model()
    assert "seer_config" in vars(base) and len(sa.gate_parameters(peft_model)) == 2 * 2
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-4, atol=1e-4)
    sa.update_sparsity_config(peft_model, density=0.3)
    _logits(peft_model, ids)
    assert sa.get_sparsity_stats(peft_model)["density"] < 1.0
    sa.remove_seer_attention(peft_model)
    assert "seer_config" not in vars(base) and not any("seer_gate" in n for n, _ in peft_model.named_parameters())
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)
    sa.apply_seer_attention(peft_model)  # and it can be patched again


def test_gates_of_a_model_without_weights_fail_clearly():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = tiny_model("llama").config
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="meta device.*init_empty_weights"):
        sa.apply_seer_attention(empty)
    assert "seer_config" not in vars(empty) and empty.config._attn_implementation == "sdpa"


def test_layers_offloaded_by_accelerate_run_sparse():
    from accelerate import cpu_offload

    reference = tiny_model("llama")
    offloaded = tiny_model("llama")
    offloaded.load_state_dict(reference.state_dict())
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    config = sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.4)
    for model in (reference, offloaded):
        torch.manual_seed(1)
        sa.apply_seer_attention(model, config)
    ids = torch.randint(0, 96, (1, 70))
    torch.testing.assert_close(_logits(offloaded, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert sa.get_sparsity_stats(offloaded)["density"] == sa.get_sparsity_stats(reference)["density"] < 1.0


def test_save_pretrained_writes_the_base_model_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16))
    model.save_pretrained(tmp_path / "base")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    assert not info["missing_keys"]
    sa.remove_seer_attention(model)
    assert not model._keys_to_ignore_on_save
