"""The gate against a direct, loop-by-loop reading of the method."""

import math

import pytest
import torch

from seerattn_hf import GateConfig, SeerAttentionConfig
from seerattn_hf.blocks import pool_blocks, pool_blocks_padded
from seerattn_hf.gate import SeerGate, gate_weight_shapes


def _inv_freq(hidden, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, hidden, 2).float() / hidden))


def _rope(x, position, inv_freq):
    angles = position * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[half:], x[:half]])
    return x * cos + rotated * sin


def _loop_gate(gate, query, key, block_size):
    """Block by block, head by head: pool, project, rotate, score, softmax over causal key blocks."""
    batch, length, heads, _ = query.shape
    groups = heads // key.shape[2]
    blocks = math.ceil(length / block_size)
    pooling = {"avg": lambda t: t.mean(0), "max": lambda t: t.max(0).values, "min": lambda t: t.min(0).values}
    out = torch.full((batch, heads, blocks, blocks), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            gate_q, gate_k = [], []
            for n in range(blocks):
                span = slice(n * block_size, (n + 1) * block_size)
                q_in = torch.cat([pooling[k](query[b, span, h].double()) for k in gate.q_pooling])
                k_in = torch.cat([pooling[k](key[b, span, h // groups].double()) for k in gate.k_pooling])
                inv_freq = gate.rope_inv_freq.double()
                q_out = q_in if gate.q_weight is None else q_in @ gate.q_weight[h].double()
                k_map = gate.k_weight[h if gate.k_projection == "query_head" else h // groups]
                gate_q.append(_rope(q_out, n * block_size, inv_freq))
                gate_k.append(_rope(k_in @ k_map.double(), n * block_size, inv_freq))
            for i in range(blocks):
                scores = torch.stack([gate_q[i] @ gate_k[j] for j in range(i + 1)]) / math.sqrt(gate_q[i].shape[0])
                out[b, h, i, : i + 1] = scores.log_softmax(0)
    return out


@pytest.mark.parametrize("length", [5, 32, 77])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=lambda h: f"HQ{h[0]}-HKV{h[1]}")
@pytest.mark.parametrize("pooling", [(["avg"], ["max", "min", "avg"]), (["max", "avg"], ["avg"])])
def test_gate_matches_loop_reading(length, heads, pooling):
    config = SeerAttentionConfig(block_size=16, gate_hidden_size=8, q_pooling=pooling[0], k_pooling=pooling[1])
    gate = SeerGate(heads[0], heads[1], 4, config, _inv_freq(8))
    query, key = torch.randn(2, length, heads[0], 4), torch.randn(2, length, heads[1], 4)
    log_probs = gate(query, key)
    expected = _loop_gate(gate, query, key, 16)
    torch.testing.assert_close(log_probs.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("q_projection, k_projection",
                         [(True, "query_head"), (False, "query_head"), (False, "kv_head")])
def test_other_layouts_match_the_loop_reading(q_projection, k_projection):
    config = GateConfig(block_size=16, gate_hidden_size=8, q_projection=q_projection, k_projection=k_projection)
    gate = SeerGate(4, 2, 8, config, _inv_freq(8))
    with torch.no_grad():
        for weight in gate.parameters():
            weight.normal_()
    assert (gate.q_weight is None) == (not q_projection)
    assert gate.k_weight.shape == ((4 if k_projection == "query_head" else 2), 24, 8)
    query, key = torch.randn(2, 40, 4, 8), torch.randn(2, 40, 2, 8)
    torch.testing.assert_close(gate(query, key).double(), _loop_gate(gate, query, key, 16), rtol=1e-4, atol=1e-4)


def test_model_dtype_computation_follows_the_inputs_dtype():
    config = GateConfig(block_size=16, gate_hidden_size=8, compute_dtype="model")
    gate = SeerGate(4, 2, 8, config, _inv_freq(8))
    query, key = torch.randn(1, 64, 4, 8), torch.randn(1, 64, 2, 8)
    probs = gate(query.bfloat16(), key.bfloat16(), probabilities=True)
    assert probs.dtype == torch.bfloat16 and gate.q_weight.dtype == torch.float32
    assert gate(query.bfloat16(), key.bfloat16()).dtype == torch.float32  # log-probabilities for training
    # The same gate in float32 on the same (rounded) inputs differs only by bf16 rounding.
    expected = gate(query.bfloat16().float(), key.bfloat16().float(), probabilities=True)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(probs.float(), expected, rtol=0.05, atol=0.02)
    float32_gate = SeerGate(4, 2, 8, config.replace(compute_dtype="float32"), _inv_freq(8))
    float32_gate.load_state_dict(gate.state_dict())
    assert float32_gate(query.bfloat16(), key.bfloat16(), probabilities=True).dtype == torch.float32


def test_a_gate_without_q_projection_needs_the_head_dim_as_its_width():
    config = GateConfig(gate_hidden_size=8, q_projection=False, k_projection="query_head")
    assert gate_weight_shapes(config, 4, 2, 8) == {"k_weight": (4, 24, 8)}
    with pytest.raises(ValueError, match="expected the model's head_dim 16 with q_projection=False.*found 8"):
        gate_weight_shapes(config, 4, 2, 16)
    with pytest.raises(ValueError, match=r"GateConfig\.q_pooling: expected a single pooling kind"):
        GateConfig(q_pooling=["avg", "max"], q_projection=False)


def test_padded_sequences_pool_in_their_own_block_frame():
    x = torch.randn(2, 40, 3, 4)
    offsets = torch.tensor([0, 13])
    pooled = pool_blocks_padded(x, ["avg", "max"], 16, offsets)
    torch.testing.assert_close(pooled[1, :2], pool_blocks(x[1:, 13:], ["avg", "max"], 16)[0])
    assert (pooled[1, 2] == 0).all()
    torch.testing.assert_close(pooled[0], pool_blocks(x[:1], ["avg", "max"], 16)[0])


def test_gate_is_invariant_to_left_padding():
    config = SeerAttentionConfig(block_size=16, gate_hidden_size=8)
    gate = SeerGate(2, 1, 4, config, _inv_freq(8))
    query, key = torch.randn(1, 50, 2, 4), torch.randn(1, 50, 1, 4)
    pad = 21
    padded_q = torch.cat([torch.randn(1, pad, 2, 4), query], 1)
    padded_k = torch.cat([torch.randn(1, pad, 1, 4), key], 1)
    alone = gate(query, key)
    padded = gate(padded_q, padded_k, torch.tensor([pad]))
    torch.testing.assert_close(padded[:, :, :4, :4], alone)


def test_gate_rejects_wrong_shapes():
    gate = SeerGate(4, 2, 8, SeerAttentionConfig(gate_hidden_size=8), _inv_freq(8))
    with pytest.raises(ValueError, match=r"gate expects query \[B, TQ, 4, 8\]"):
        gate(torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SeerGate(3, 2, 8, SeerAttentionConfig(gate_hidden_size=8), _inv_freq(8))


@pytest.mark.parametrize("chunk", [48, 37, 5], ids=["block-aligned", "inside-a-block", "inside-one-block"])
def test_a_query_chunk_scores_the_rows_of_the_whole_prompt(chunk):
    """A chunk of the last queries against all keys: the rows of its blocks whose queries all lie in
    the chunk score as the whole prompt scores them; a first block partly cached pools the chunk's
    queries of that block."""
    config = SeerAttentionConfig(block_size=16, gate_hidden_size=8)
    gate = SeerGate(4, 2, 4, config, _inv_freq(8))
    length = 90
    query, key = torch.randn(2, length, 4, 4), torch.randn(2, length, 2, 4)
    whole = gate(query, key)
    scores = gate(query[:, -chunk:], key)
    start = length - chunk
    first_row = start // 16
    assert scores.shape == (2, 4, 6 - first_row, 6)
    partial = start % 16 != 0
    torch.testing.assert_close(scores[:, :, int(partial):], whole[:, :, first_row + int(partial):])
    if partial:
        # The partial block's query is the chunk's part of it: as a prompt whose block holds only those.
        block_end = min((first_row + 1) * 16, length)
        shifted = query.clone()
        shifted[:, first_row * 16: block_end] = query[:, start: block_end].mean(1, keepdim=True)
        expected = gate(shifted, key)[:, :, first_row]
        torch.testing.assert_close(scores[:, :, 0], expected)


def test_a_query_chunk_is_invariant_to_left_padding():
    config = SeerAttentionConfig(block_size=16, gate_hidden_size=8)
    gate = SeerGate(2, 1, 4, config, _inv_freq(8))
    query, key = torch.randn(1, 60, 2, 4), torch.randn(1, 60, 1, 4)
    pad, chunk = 21, 27
    padded_q = torch.cat([torch.randn(1, pad, 2, 4), query], 1)
    padded_k = torch.cat([torch.randn(1, pad, 1, 4), key], 1)
    # Two sequences: the padded one and the unpadded one, whose chunk starts at another residue.
    batch_q = torch.cat([padded_q, torch.cat([query, torch.randn(1, pad, 2, 4)], 1)])
    batch_k = torch.cat([padded_k, torch.cat([key, torch.randn(1, pad, 1, 4)], 1)])
    scores = gate(batch_q[:, -chunk:], batch_k, torch.tensor([pad, 0]))
    alone = gate(query[:, -chunk:], key)
    torch.testing.assert_close(scores[:1, :, : alone.shape[2], : alone.shape[3]], alone)


@pytest.mark.parametrize("layout", [
    (1, 77, 77, 4, 1, None),  # a whole prompt, partial last block, GQA 4:1
    (2, 90, 90, 4, 2, [0, 23]),  # left padding
    (2, 37, 130, 4, 2, [5, 0]),  # a chunk continued from a cache, starting inside a block
], ids=["prompt-GQA", "padding", "chunk-padding"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["log_probs", "probs"])
def test_fused_scoring_matches_the_torch_path(layout, probabilities, monkeypatch):
    import seerattn_hf.gate as gate_module

    calls = []
    for name in ("triton_gate_scores", "triton_gate_projection"):
        kernel = getattr(gate_module, name)
        monkeypatch.setattr(gate_module, name, lambda *args, _kernel=kernel, _name=name: calls.append(_name)
                            or _kernel(*args))
    batch, query_length, key_length, heads, kv_heads, offsets = layout
    # The padded layout also maps pooled keys per query head.
    config = SeerAttentionConfig(block_size=16, gate_hidden_size=32,
                                 k_projection="query_head" if offsets == [0, 23] else "kv_head")
    gate = SeerGate(heads, kv_heads, 16, config, _inv_freq(32), rope_scaling=1.3)
    query, key = torch.randn(batch, query_length, heads, 16), torch.randn(batch, key_length, kv_heads, 16)
    offsets = None if offsets is None else torch.tensor(offsets)
    with torch.no_grad():
        fused = gate(query, key, offsets, probabilities, fused=True)
        expected = gate(query, key, offsets, probabilities)
    assert sorted(calls) == ["triton_gate_projection", "triton_gate_projection", "triton_gate_scores"]
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_fused_projection_reads_weights_cast_with_the_model_and_leaves_long_prompts_to_torch(monkeypatch):
    import seerattn_hf.gate as gate_module

    calls = []
    kernel = gate_module.triton_gate_projection
    monkeypatch.setattr(gate_module, "triton_gate_projection",
                        lambda *args: calls.append(args[1].dtype) or kernel(*args))
    config = SeerAttentionConfig(block_size=16, gate_hidden_size=32)
    gate = SeerGate(4, 2, 16, config, _inv_freq(32)).to(torch.bfloat16)  # as `model.to(torch.bfloat16)` does
    query, key = torch.randn(1, 70, 4, 16), torch.randn(1, 70, 2, 16)
    with torch.no_grad():
        fused = gate(query, key, probabilities=True, fused=True)
        expected = gate(query, key, probabilities=True)
        assert calls == [torch.float32, torch.float32], "the kernel computes from float32 weights"
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
        calls.clear()
        monkeypatch.setattr(gate_module, "FUSED_PROJECTION_MAX_TOKENS", 64)
        torch.testing.assert_close(gate(query, key, probabilities=True, fused=True), expected)
    assert calls == [], "a prompt longer than FUSED_PROJECTION_MAX_TOKENS projects through torch"


def test_the_fused_path_leaves_training_to_torch():
    gate = SeerGate(2, 1, 16, SeerAttentionConfig(block_size=16, gate_hidden_size=32), _inv_freq(32))
    log_probs = gate(torch.randn(1, 40, 2, 16), torch.randn(1, 40, 1, 16), fused=True)
    assert log_probs.requires_grad  # autograd through the torch path
    log_probs.masked_fill(log_probs.isinf(), 0).sum().backward()
    assert gate.k_weight.grad is not None


@pytest.mark.gpu
def test_fused_scoring_matches_the_torch_path_bf16_gpu():
    config = SeerAttentionConfig()
    gate = SeerGate(32, 8, 128, config, _inv_freq(128)).cuda()
    query = torch.randn(1, 8192 + 17, 32, 128, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(1, 8192 + 17, 8, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = gate(query, key, probabilities=True, fused=True)
        expected = gate(query, key, probabilities=True)
    assert (fused - expected).abs().max() < 1e-5
