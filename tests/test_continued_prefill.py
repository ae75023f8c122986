"""Sparse continued prefill: a chunk of new tokens on top of a cache runs block-sparse, its gate
scoring the chunk's query blocks against every key block (cached and new)."""

import pytest
import torch
from model_factory import TINY_ARCHITECTURES, tiny_model
from transformers import DynamicCache

import seerattn_hf as sa
from seerattn_hf.ops.block_sparse_attn import naive_block_sparse_attention

CHUNKS = [37, 29, 50]  # none a multiple of the 16-token block: chunks start inside blocks


def _chunked_logits(model, input_ids, chunks, attention_mask=None):
    """Logits of `input_ids` fed chunk by chunk through one DynamicCache."""
    cache, logits, start = DynamicCache(), [], 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            mask = None if attention_mask is None else attention_mask[:, :end]
            out = model(input_ids=input_ids[:, start:end], attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            start = end
    return torch.cat(logits, dim=1)


def _density(density, **changes):
    return sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=density, **changes)


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_chunked_prefill_at_full_density_equals_one_shot(model_type):
    model = tiny_model(model_type, num_heads=4, num_kv_heads=2)
    input_ids = torch.randint(0, 96, (2, sum(CHUNKS)))
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
    sa.apply_seer_attention(model, _density(1.0))
    chunked = _chunked_logits(model, input_ids, CHUNKS)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    stats = sa.get_sparsity_stats(model)
    layers = model.config.num_hidden_layers
    assert stats["paths"] == {"sparse": layers, "sparse_continued": 2 * layers}
    assert stats["density"] == 1.0


def _masked_dense_chunk(query, key, value, block_idx, block_count, block_size, scale):
    """float64 attention of the last TQ positions over the listed blocks, token mask spelled out."""
    batch, heads, query_length, _ = query.shape
    key_length, groups = key.shape[2], heads // key.shape[1]
    positions = torch.arange(key_length - query_length, key_length)
    rows = positions // block_size - (key_length - query_length) // block_size  # list row of each query
    kept = torch.zeros(batch, block_idx.shape[1], block_idx.shape[2], -(-key_length // block_size), dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in block_count.shape)).tolist():
        kept[tuple(index) + (block_idx[tuple(index)][: block_count[tuple(index)]].long(),)] = True
    kept = kept.repeat_interleave(heads // kept.shape[1], dim=1)
    token_mask = kept[:, :, rows][..., torch.arange(key_length) // block_size]
    token_mask &= torch.arange(key_length) <= positions[:, None]
    scores = query.double() @ key.double().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    probs = scores.masked_fill(~token_mask, float("-inf")).softmax(-1)
    return (probs @ value.double().repeat_interleave(groups, 1)).transpose(1, 2)


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("sharing", ["head", "kv_group"])
def test_sparse_chunks_compute_the_kept_blocks(model_type, sharing, monkeypatch):
    model = tiny_model(model_type, num_heads=4, num_kv_heads=2)
    sa.apply_seer_attention(model, _density(0.3, mask_sharing=sharing))
    calls = []

    def recording(query, key, value, block_idx, block_count, block_size, scale, seq_offsets, backend):
        calls.append((query, key, value, block_idx, block_count, block_size, scale))
        return naive_block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale=scale,
                                            seq_offsets=seq_offsets)

    monkeypatch.setattr("seerattn_hf.attention.block_sparse_attention", recording)
    _chunked_logits(model, torch.randint(0, 96, (2, sum(CHUNKS))), CHUNKS)
    continued = [call for call in calls if call[0].shape[2] < call[1].shape[2]]
    assert len(continued) == 2 * model.config.num_hidden_layers
    dropped = False
    for query, key, value, block_idx, block_count, block_size, scale in continued:
        causal_rows = torch.arange(block_count.shape[-1]) + (key.shape[2] - query.shape[2]) // block_size + 1
        dropped |= bool((block_count < causal_rows).any())
        computed = naive_block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale=scale)
        expected = _masked_dense_chunk(query, key, value, block_idx, block_count, block_size, scale)
        torch.testing.assert_close(computed.double(), expected, rtol=1e-5, atol=1e-5)
    assert dropped, "density 0.3 should drop some causal blocks of the chunks"
    assert 0.3 <= sa.get_sparsity_stats(model)["density"] < 1.0


def test_block_aligned_chunks_select_the_blocks_of_the_whole_prompt(monkeypatch):
    """The gate of a chunk sees the cached keys as the whole prompt's gate sees them (recovered
    from the post-RoPE cache), so chunks on block boundaries keep the whole prompt's blocks."""
    model = tiny_model("qwen3", num_heads=4, num_kv_heads=2)
    sa.apply_seer_attention(model, _density(0.3))
    lists = []

    def recording(query, key, value, block_idx, block_count, block_size, scale, seq_offsets, backend):
        lists.append((block_idx, block_count))
        return naive_block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale=scale)

    monkeypatch.setattr("seerattn_hf.attention.block_sparse_attention", recording)
    input_ids = torch.randint(0, 96, (1, 112))
    with torch.no_grad():
        model(input_ids=input_ids)
    whole, lists[:] = list(lists), []
    _chunked_logits(model, input_ids, [48, 64])
    layers = model.config.num_hidden_layers
    for (whole_idx, whole_count), (chunk_idx, chunk_count) in zip(whole, lists[layers:]):
        assert torch.equal(chunk_count, whole_count[:, :, 3:])
        for row in range(chunk_count.shape[-1]):
            n = int(chunk_count[0, 0, row])
            assert torch.equal(chunk_idx[..., row, :n], whole_idx[..., 3 + row, :n])


@pytest.mark.parametrize("chunks", [[33, 37], [20, 50]], ids=["padding-cached", "padding-in-both-chunks"])
def test_left_padded_chunks_match_unpadded_one_shot_runs(chunks):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2)
    sa.apply_seer_attention(model, _density(1.0))
    lengths, width = [70, 41], 70
    input_ids = torch.zeros(2, width, dtype=torch.long)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(1, 96, (length,))
        attention_mask[row, width - length:] = 1
    chunked = _chunked_logits(model, input_ids, chunks, attention_mask)
    assert sa.get_sparsity_stats(model)["paths"]["sparse_continued"] == model.config.num_hidden_layers
    for row, length in enumerate(lengths):
        with torch.no_grad():
            alone = model(input_ids=input_ids[row:row + 1, width - length:]).logits
        torch.testing.assert_close(chunked[row, width - length:], alone[0], rtol=1e-4, atol=1e-4)


def test_generate_continues_a_prompt_from_a_cache():
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=1)
    first_turn, follow_up = torch.randint(1, 96, (1, 45)), torch.randint(1, 96, (1, 27))
    prompt = torch.cat([first_turn, follow_up], dim=1)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    sa.apply_seer_attention(model, _density(1.0))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=first_turn, past_key_values=cache, use_cache=True)
    sa.reset_sparsity_stats(model)
    generated = model.generate(prompt, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)
    paths = sa.get_sparsity_stats(model)["paths"]
    assert paths["sparse_continued"] == model.config.num_hidden_layers and "sparse" not in paths


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_triton_chunks_match_the_torch_path_gpu(density):
    """The fused gate, fused selection and Triton kernel against the torch path, chunks included."""
    model = tiny_model("qwen3", num_heads=8, num_kv_heads=2, head_dim=32).cuda()
    input_ids = torch.randint(0, 96, (2, 700), device="cuda")
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
    sa.apply_seer_attention(model, _density(density, backend="torch"))
    torch_path = _chunked_logits(model, input_ids, [300, 250, 150])
    sa.update_sparsity_config(model, backend="triton")
    triton_path = _chunked_logits(model, input_ids, [300, 250, 150])
    torch.testing.assert_close(triton_path, torch_path, rtol=1e-4, atol=1e-4)
    if density == 1.0:
        torch.testing.assert_close(triton_path, reference, rtol=1e-4, atol=1e-4)
