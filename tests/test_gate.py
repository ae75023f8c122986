"""The gate against a direct, loop-by-loop reading of the method."""

import math

import pytest
import torch

from seerattn_hf import SeerAttentionConfig
from seerattn_hf.blocks import pool_blocks, pool_blocks_padded
from seerattn_hf.gate import SeerGate


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
                gate_q.append(_rope(q_in @ gate.q_weight[h].double(), n * block_size, inv_freq))
                gate_k.append(_rope(k_in @ gate.k_weight[h // groups].double(), n * block_size, inv_freq))
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
    with pytest.raises(ValueError, match=r"gate expects query \[B, T, 4, 8\]"):
        gate(torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SeerGate(3, 2, 8, SeerAttentionConfig(gate_hidden_size=8), _inv_freq(8))
