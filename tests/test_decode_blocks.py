"""Decode gate, per-block key summaries and decode-time selection, against direct computations."""

import pytest
import torch

from seerattn_hf.decode_cache import KeyBlockCache, key_blocks_of
from seerattn_hf.decode_gate import DecodeGateConfig, SeerDecodeGate, pool_key_blocks
from seerattn_hf.decode_selection import decode_block_lists, oracle_mass_scores, oracle_scores, quest_scores
from seerattn_hf.rope import apply_rope


def _inv_freq(dim, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _gate(config=DecodeGateConfig(block_size=16, gate_hidden_size=8), heads=4, kv_heads=2, dim=8):
    torch.manual_seed(3)
    gate = SeerDecodeGate(heads, kv_heads, dim, config, _inv_freq(config.gate_hidden_size))
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.normal_()
    return gate


def test_rope_inverse_is_exact():
    x = torch.randn(2, 3, 37, 16)
    positions = torch.arange(37) + 5
    rotated = apply_rope(x, positions, _inv_freq(16, 500000.0), 1.3)
    torch.testing.assert_close(apply_rope(rotated, positions, _inv_freq(16, 500000.0), 1.3, inverse=True), x,
                               rtol=1e-5, atol=1e-5)


def test_pooling_ignores_invalid_tokens():
    keys = torch.randn(2, 3, 4, 5)
    valid = torch.rand(2, 3, 4) > 0.4
    pooled = pool_key_blocks(keys, valid, ("max", "min", "avg"))
    for b in range(2):
        for n in range(3):
            real = keys[b, n][valid[b, n]]
            expected = (torch.cat((real.amax(0), real.amin(0), real.mean(0))) if len(real)
                        else torch.zeros(15))
            torch.testing.assert_close(pooled[b, n], expected)


@pytest.mark.parametrize("q_head_map", ["linear", "mean"])
def test_gate_queries_and_keys_follow_the_method(q_head_map):
    config = DecodeGateConfig(block_size=16, gate_hidden_size=8, q_head_map=q_head_map)
    gate = _gate(config)
    query = torch.randn(2, 1, 4, 8)
    positions = torch.tensor([[40], [17]])
    got = gate.queries(query, positions)
    for b in range(2):
        for k in range(2):
            group = query[b, 0, 2 * k: 2 * k + 2]  # [G, D]
            if q_head_map == "linear":
                projected = sum(group[g] @ gate.q_weight[k, g] for g in range(2))
            else:
                projected = group.mean(0) @ gate.q_weight[k]
            normed = projected / projected.pow(2).mean().add(1e-6).sqrt() * gate.q_norm_weight
            expected = apply_rope(normed[None], positions[b], gate.rope_inv_freq)[0]
            torch.testing.assert_close(got[b, k, 0], expected, rtol=1e-4, atol=1e-5)


def _rotated_keys(batch, kv_heads, length, dim, offsets):
    pre = torch.randn(batch, kv_heads, length, dim)
    positions = torch.arange(length)[None, :] - offsets[:, None]
    post = apply_rope(pre, positions[:, None].clamp(min=0), _inv_freq(dim))
    padding = positions[:, None, :, None] < 0
    return pre.masked_fill(padding, 0.0), post.masked_fill(padding, float("nan"))


@pytest.mark.parametrize("quest", [False, True])
def test_summaries_kept_step_by_step_equal_a_full_recomputation(quest):
    gate = _gate()
    offsets = torch.tensor([0, 5])
    total, prompt = 61, 23
    pre, post = _rotated_keys(2, 2, total, 8, offsets)
    summaries = KeyBlockCache(16)
    for end in [prompt] + list(range(prompt + 1, total + 1)):
        new = prompt if end == prompt else 1
        summaries.refresh(post[:, :, :end], offsets, end - offsets, new, gate, (_inv_freq(8), 1.0), quest)
    lengths = total - offsets
    for b in range(2):
        blocks = int(lengths[b]) // 16  # complete blocks: the only ones ever scored
        own = pre[b, :, int(offsets[b]):]
        for j in range(blocks):
            chunk = own[:, 16 * j: 16 * (j + 1)]
            valid = torch.ones(chunk.shape[:2], dtype=torch.bool)
            expected = gate.keys(pool_key_blocks(chunk[None, :, None], valid[None, :, None], gate.config.k_pooling),
                                 torch.tensor([[16 * j]]))[0, :, 0]
            torch.testing.assert_close(summaries.gate_keys[b, :, j], expected, rtol=1e-4, atol=1e-4)
            if quest:
                rotated = post[b, :, int(offsets[b]) + 16 * j: int(offsets[b]) + 16 * (j + 1)]
                torch.testing.assert_close(summaries.key_max[b, :, j], rotated.amax(1))
                torch.testing.assert_close(summaries.key_min[b, :, j], rotated.amin(1))


def test_summaries_follow_a_reordered_and_cropped_cache():
    from transformers import DynamicCache

    gate = _gate()
    cache = DynamicCache()
    _, post = _rotated_keys(3, 2, 40, 8, torch.zeros(3, dtype=torch.long))
    cache.update(post, post, 0)
    layer = cache.layers[0]
    summaries = key_blocks_of(layer, 16, 0)
    summaries.refresh(post, torch.zeros(3, dtype=torch.long), torch.full((3,), 40), 40, gate, (_inv_freq(8), 1.0), False)
    before = summaries.gate_keys.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(key_blocks_of(layer, 16, 0).gate_keys, before[[2, 0, 1]])
    cache.crop(-20)  # remove 20 positions (both crop conventions agree on negative values)
    assert (summaries.cache_tokens, summaries.summarized_tokens) == (20, None)  # still summarized throughout


def test_budget_lists_keep_the_best_blocks_and_the_current_one():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 10)
    current = torch.tensor([7, 2])
    block_idx, block_count = decode_block_lists(scores, current, 16, "token_budget", 4 * 16, 0.0,
                                                keep_first_block=False, probabilities=True)
    assert block_count.tolist() == [[4, 4, 4], [3, 3, 3]]
    for b in range(2):
        for h in range(3):
            kept = set(block_idx[b, h, : block_count[b, h]].tolist())
            candidates = scores[b, h, : current[b]]
            best = set(candidates.topk(min(3, int(current[b]))).indices.tolist())
            assert kept == best | {int(current[b])}


def test_threshold_lists_and_the_sink_block():
    scores = torch.log(torch.tensor([[[0.5, 0.05, 0.3, 0.15, 9.0]]]))
    block_idx, block_count = decode_block_lists(scores, torch.tensor([4]), 16, "threshold", 0, 0.1,
                                                keep_first_block=False, probabilities=True)
    assert set(block_idx[0, 0, : block_count[0, 0]].tolist()) == {0, 2, 3, 4}
    block_idx, block_count = decode_block_lists(scores, torch.tensor([4]), 16, "token_budget", 32, 0.0,
                                                keep_first_block=True, probabilities=True)
    assert set(block_idx[0, 0, : block_count[0, 0]].tolist()) == {0, 4}


def test_oracle_oracle_mass_and_quest_scores():
    torch.manual_seed(1)
    query, keys = torch.randn(1, 4, 8), torch.randn(1, 2, 40, 8)
    offsets, lens = torch.tensor([3]), torch.tensor([37])
    scores = oracle_scores(query, keys, offsets, lens, 16, 3, 0.35)
    probs = (torch.einsum("bhd,bhsd->bhs", query, keys.repeat_interleave(2, 1)[..., 3:, :]) * 0.35).softmax(-1)
    for k in range(2):
        group = probs[0, 2 * k: 2 * k + 2].amax(0)
        expected = torch.stack([group[16 * j: 16 * (j + 1)].max() for j in range(3)])
        torch.testing.assert_close(scores[0, k], expected)
    mass = oracle_mass_scores(query, keys, offsets, lens, 16, 3, 0.35)
    for k in range(2):
        group = probs[0, 2 * k: 2 * k + 2].mean(0)  # the GQA group's mean, summed over each block
        torch.testing.assert_close(mass[0, k], torch.stack([group[16 * j: 16 * (j + 1)].sum() for j in range(3)]))
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 2))
    key_max, key_min = keys.view(1, 2, 5, 8, 8).amax(3), keys.view(1, 2, 5, 8, 8).amin(3)
    bound = quest_scores(query, key_max, key_min)
    exact = torch.einsum("bhd,bhsd->bhs", query, keys.repeat_interleave(2, 1)).view(1, 4, 5, 8).amax(-1)
    assert (bound >= exact.view(1, 2, 2, 5).amax(2) - 1e-5).all()
