"""Sparse decoding inside generate(): against the unpatched model, with every cache kind and batch
operation generate() uses."""

import pytest
import torch
import torch._dynamo
from model_factory import TINY_ARCHITECTURES, tiny_model

import seerattn_hf as sa
from seerattn_hf.decode_gate import DecodeGateConfig

SELECTORS = ("gate", "oracle", "oracle_mass", "quest", "streaming")


def _pair(model_type="llama", head_dim=16, num_heads=4, num_kv_heads=2, **config):
    """(unpatched model, the same weights patched with prefill and decode gates at full density)."""
    torch.manual_seed(0)
    shape = {"head_dim": head_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    base = tiny_model(model_type, **shape)
    patched = tiny_model(model_type, **shape)
    patched.load_state_dict(base.state_dict())
    decode_gate = DecodeGateConfig(block_size=16, gate_hidden_size=16)
    values = {"block_size": 16, "sparsity_method": "density", "density": 1.0, **config}
    sa.apply_seer_attention(patched, sa.SeerAttentionConfig(decode_gate=decode_gate, **values))
    with torch.no_grad():
        for parameter in sa.gate_parameters(patched):
            parameter.normal_()
    for model in (base, patched):
        model.generation_config.pad_token_id = 0
    return base, patched


def _prompt(batch=2, length=37, padding=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=generator)  # no pad id inside the prompt
    mask = torch.ones_like(ids)
    mask[0, :padding] = 0
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, **kwargs)


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("cache", [None, "static"])
def test_a_budget_covering_the_context_reproduces_dense(model_type, selector, cache):
    base, patched = _pair(model_type)
    ids, mask = _prompt()
    expected = _generate(base, ids, mask, cache_implementation=cache)
    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=4096)
    assert torch.equal(_generate(patched, ids, mask, cache_implementation=cache), expected)
    assert sa.get_sparsity_stats(patched)["decode_density"] == pytest.approx(1.0)


@pytest.mark.parametrize("budget, keep_first_block", [(32, False), (48, True), (64, False)])
def test_oracle_mass_keeps_at_least_the_attention_mass_the_max_oracle_keeps(budget, keep_first_block, monkeypatch):
    """At one token budget, per decoding step, sequence and KV head, the blocks oracle_mass keeps
    hold at least the attention mass (the GQA group's mean, summed over the kept blocks) that the
    max-pooled oracle's blocks hold: top-k of the block mass is the best selection of k blocks.
    Layer 0 sees the same queries and keys in both runs (its inputs are the token embeddings, and
    the tokens are teacher-forced), so its steps compare one to one."""
    import seerattn_hf.decode_attention as decode_attention
    from seerattn_hf.decode_selection import oracle_mass_scores

    base, patched = _pair(num_heads=8, num_kv_heads=2)  # groups of 4 query heads
    ids, mask = _prompt(batch=3, length=120, padding=23, seed=7)
    calls = {}
    real = decode_attention.sparse_decode_attention
    for selector in ("oracle", "oracle_mass"):
        recorded = calls[selector] = []

        def recording(query, key, value, block_idx, block_count, size, lens, scale, offsets, use_triton):
            recorded.append((query.clone(), key.clone(), block_idx.clone(), block_count.clone(), size, lens.clone(),
                             scale, offsets.clone()))
            return real(query, key, value, block_idx, block_count, size, lens, scale, offsets, use_triton)

        monkeypatch.setattr(decode_attention, "sparse_decode_attention", recording)
        sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=budget,
                                  decode_keep_first_block=keep_first_block)
        with torch.no_grad():
            out = patched(input_ids=ids[:, :50], attention_mask=mask[:, :50], use_cache=True)
            cache = out.past_key_values
            for t in range(50, 120):
                out = patched(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                              use_cache=True)
                cache = out.past_key_values
    layers = patched.config.num_hidden_layers
    assert len(calls["oracle"]) == len(calls["oracle_mass"]) == 70 * layers  # every layer decodes each step

    def kept_mass(step):
        query, key, block_idx, block_count, size, lens, scale, offsets = step
        mass = oracle_mass_scores(query, key, offsets, lens, size, -(-key.shape[2] // size), scale)
        kept = torch.arange(block_idx.shape[-1]) < block_count[..., None]
        return (mass.gather(-1, block_idx.long()) * kept).sum(-1), mass  # [B, HKV]

    gained = []
    for max_step, mass_step in zip(calls["oracle"][::layers], calls["oracle_mass"][::layers]):  # layer 0
        assert torch.equal(max_step[0], mass_step[0]) and torch.equal(max_step[1], mass_step[1])
        assert torch.equal(max_step[3], mass_step[3])  # the same number of blocks
        by_max, mass = kept_mass(max_step)
        by_mass, _ = kept_mass(mass_step)
        torch.testing.assert_close(mass.sum(-1), torch.ones_like(by_max))  # each head's probabilities sum to 1
        assert (by_mass >= by_max - 1e-6).all()
        gained.append(by_mass - by_max)
    assert torch.stack(gained).mean() > 0  # and the two rankings do differ


@pytest.mark.parametrize("selector", SELECTORS)
def test_teacher_forced_logits_equal_dense_at_full_budget_and_differ_below(selector):
    base, patched = _pair()
    ids, mask = _prompt(length=70)
    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=4096)

    def step_logits(model):
        out = model(input_ids=ids[:, :40], attention_mask=mask[:, :40], use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for t in range(40, 70):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
        return torch.stack(logits, 1)

    with torch.no_grad():
        dense = step_logits(base)
        torch.testing.assert_close(step_logits(patched), dense, rtol=1e-4, atol=1e-4)
        sa.update_sparsity_config(patched, decode_token_budget=32)  # the current block and one more
        sa.reset_sparsity_stats(patched)
        sparse = step_logits(patched)
    stats = sa.get_sparsity_stats(patched)
    assert stats["decode_density"] < 0.8 and stats["decode_blocks"] > 0
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse[:, 10:], dense[:, 10:], atol=1e-3)


def _recomputing_summaries(monkeypatch):
    """Make every call recompute every block's summary from the cache: the reference for the
    incremental upkeep (and, since it reads the cache as it is, for following its batch operations)."""
    from seerattn_hf.decode_cache import KeyBlockCache

    incremental = KeyBlockCache.refresh

    def from_scratch(self, *args, **kwargs):
        self.summarized_tokens = 0
        return incremental(self, *args, **kwargs)

    monkeypatch.setattr(KeyBlockCache, "refresh", from_scratch)


@pytest.mark.parametrize("selector", ["gate", "quest"])
def test_beam_search_and_assisted_decoding_follow_the_cache(selector, monkeypatch):
    base, patched = _pair()
    ids, mask = _prompt(batch=1, padding=0, length=45)
    assistant = tiny_model("llama", num_layers=1)
    assistant.generation_config.pad_token_id = 0
    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=4096)
    assert torch.equal(_generate(patched, ids, mask, num_beams=3), _generate(base, ids, mask, num_beams=3))
    # At a budget that leaves blocks out, what is kept depends on the summaries being right.
    sa.update_sparsity_config(patched, decode_token_budget=32)
    incremental = [_generate(patched, ids, mask, num_beams=3), _generate(patched, ids, mask, assistant_model=assistant)]
    _recomputing_summaries(monkeypatch)
    assert torch.equal(incremental[0], _generate(patched, ids, mask, num_beams=3))
    assert torch.equal(incremental[1], _generate(patched, ids, mask, assistant_model=assistant))


@pytest.mark.parametrize("selector", [None, "quest"])
def test_the_model_keeps_no_cache_alive_after_a_call(selector):
    """A patched model must not hold the last cache (and so all its memory) once the caller drops it."""
    import gc
    import weakref

    from transformers import DynamicCache

    _, patched = _pair()
    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=32)
    ids, mask = _prompt()
    cache = DynamicCache(config=patched.config)
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        patched(input_ids=ids[:, -1:], attention_mask=torch.cat((mask, mask[:, -1:]), dim=1),
                past_key_values=cache, use_cache=True)
    released = weakref.ref(cache)
    del cache
    gc.collect()
    assert released() is None


def test_dense_mode_and_no_selector_decode_like_the_unpatched_model():
    base, patched = _pair()
    ids, mask = _prompt()
    expected = _generate(base, ids, mask)
    assert torch.equal(_generate(patched, ids, mask), expected)
    assert sa.get_sparsity_stats(patched)["decode_density"] is None
    sa.update_sparsity_config(patched, decode_selector="quest", decode_token_budget=16)
    sa.set_attention_mode(patched, "dense")
    assert torch.equal(_generate(patched, ids, mask), expected)


def test_switching_the_selector_mid_generation_rebuilds_the_summaries(monkeypatch):
    _, patched = _pair()
    ids, mask = _prompt(length=50)
    step = torch.full((2, 1), 7)
    full_mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), 1)

    def next_logits(selector_before):
        sa.update_sparsity_config(patched, decode_selector=selector_before, decode_token_budget=32)
        with torch.no_grad():
            cache = patched(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            sa.update_sparsity_config(patched, decode_selector="quest")
            return patched(input_ids=step, attention_mask=full_mask, past_key_values=cache).logits

    switched = [next_logits(None), next_logits("gate")]
    _recomputing_summaries(monkeypatch)
    expected = next_logits("quest")
    for logits in switched:
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("selector", SELECTORS)
def test_dense_decoding_steps_capture_nothing_and_sparse_steps_after_them_decode_right(selector, monkeypatch):
    """Sparse mode with the gate selecting prompt blocks: a prompt captures the pre-RoPE query and
    key, a dense decoding step (decode_selector None) neither, a step decoding with the decode gate
    the query alone; and sparse steps after dense ones (across block completions) decode as with
    every summary recomputed from the cache."""
    from seerattn_hf.attention import SeerLayerState
    from transformers import DynamicCache

    _, patched = _pair()
    ids = torch.randint(3, 96, (1, 90), generator=torch.Generator().manual_seed(3))
    taken = []
    take_captured = SeerLayerState.take_captured

    def recording(self):
        query, key = take_captured(self)
        taken.append((query is not None, key is not None))
        return query, key

    def logits():
        cache = DynamicCache(config=patched.config)
        out, captured = [], []
        with torch.no_grad():
            for start, end, decode_selector in ((0, 40, selector), (40, 44, selector), (44, 70, None),
                                                (70, 90, selector)):
                sa.update_sparsity_config(patched, decode_selector=decode_selector, decode_token_budget=32)
                for t in range(start, end) if start else [None]:
                    piece = ids[:, :end] if t is None else ids[:, t:t + 1]
                    taken.clear()
                    out.append(patched(input_ids=piece, past_key_values=cache).logits[:, -1])
                    captured.append((t is None, decode_selector, set(taken)))
        return torch.cat(out), captured

    monkeypatch.setattr(SeerLayerState, "take_captured", recording)
    incremental, captured = logits()
    for prompt, decode_selector, calls in captured:
        expected = (True, True) if prompt else (decode_selector == "gate", False)
        assert calls == {expected}, (prompt, decode_selector)
    _recomputing_summaries(monkeypatch)
    torch.testing.assert_close(incremental, logits()[0], rtol=0, atol=0)


def test_summaries_take_at_most_a_hundredth_of_the_kv_cache():
    torch.manual_seed(0)
    model = tiny_model("llama", head_dim=64, num_heads=2, num_kv_heads=1)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=64, gate_hidden_size=64,
                                                          decode_gate=DecodeGateConfig(gate_hidden_size=64),
                                                          decode_selector="gate"))
    ids = torch.randint(3, 96, (1, 500))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        model(input_ids=ids[:, :1], past_key_values=cache)
    layer = cache.layers[0]
    kv_bytes = layer.keys.numel() * layer.keys.element_size() * 2
    summary_bytes = layer.seer_key_blocks.gate_keys.numel() * layer.seer_key_blocks.gate_keys.element_size()
    assert summary_bytes <= kv_bytes / 100


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_cache_cropped_across_blocks_keeps_its_summaries_right(cache_kind, monkeypatch):
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import StaticLayer

    if cache_kind == "static" and not hasattr(StaticLayer, "crop"):
        pytest.skip("this transformers version cannot crop a StaticCache (5.17 cannot)")
    _, patched = _pair()
    sa.update_sparsity_config(patched, decode_selector="gate", decode_token_budget=32)
    ids = torch.randint(3, 96, (1, 90), generator=torch.Generator().manual_seed(4))

    def logits_after_crop():
        cache = (DynamicCache(config=patched.config) if cache_kind == "dynamic"
                 else StaticCache(config=patched.config, max_cache_len=128))
        with torch.no_grad():
            patched(input_ids=ids[:, :50], past_key_values=cache)
            for t in range(50, 60):
                patched(input_ids=ids[:, t:t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]))
            cache.crop(-12)  # back to 48 positions, across a block boundary; then other tokens follow
            return torch.cat([patched(input_ids=ids[:, t:t + 1], past_key_values=cache,
                                      position_ids=torch.tensor([[t - 12]])).logits for t in range(60, 90)])

    incremental = logits_after_crop()
    _recomputing_summaries(monkeypatch)
    torch.testing.assert_close(incremental, logits_after_crop(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["gate", "quest"])
def test_the_triton_decode_path_is_as_accurate_as_dense_sdpa(selector):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base, patched = _pair(head_dim=64, num_heads=8, num_kv_heads=2)
    ids, mask = _prompt(length=300)
    ids, mask = ids.cuda(), mask.cuda()

    def step_logits(model, dtype, backend=None):
        model.to("cuda", dtype)
        if backend is not None:
            sa.update_sparsity_config(model, backend=backend)
        with torch.no_grad():
            out = model(input_ids=ids[:, :200], attention_mask=mask[:, :200], use_cache=True)
            cache, logits = out.past_key_values, []
            for t in range(200, 300):
                out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
                logits.append(out.logits[:, -1].float())
        return torch.stack(logits, 1)

    def rms(x):
        return x.pow(2).mean().sqrt()

    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=4096)
    reference = step_logits(base, torch.float32)
    torch.testing.assert_close(step_logits(patched, torch.float32, "triton"), reference, rtol=2e-3, atol=2e-3)
    # In bf16, the kernel's error against float32 stays within that of the model's own SDPA.
    sdpa_error = rms(step_logits(base, torch.bfloat16) - reference)
    assert rms(step_logits(patched, torch.bfloat16, "triton") - reference) <= 1.5 * sdpa_error + 1e-3
    # Below the budget, the Triton and torch decode paths keep the same blocks and agree.
    sa.update_sparsity_config(patched, decode_token_budget=128)
    torch.testing.assert_close(step_logits(patched, torch.float32, "triton"),
                               step_logits(patched, torch.float32, "torch"), rtol=2e-3, atol=2e-3)


def _compile_config(backend):
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=backend, mode="reduce-overhead" if backend == "inductor" else None,
                           dynamic=False)
    config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    return config


@pytest.mark.parametrize("selector", ["gate", "quest"])
def test_compiled_decoding_is_one_graph_that_decodes_like_eager(selector):
    _, patched = _pair()
    ids, mask = _prompt(length=37)
    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=32)
    eager = _generate(patched, ids, mask, cache_implementation="static")
    eager_stats = sa.get_sparsity_stats(patched)
    sa.reset_sparsity_stats(patched)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # fullgraph: a graph break (data-dependent Python, an untraceable kernel launch) fails the call.
    compiled = _generate(patched, ids, mask, cache_implementation="static", compile_config=_compile_config("aot_eager"))
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation at any step
    stats = sa.get_sparsity_stats(patched)
    assert (stats["decode_kept_blocks"], stats["decode_blocks"]) == (eager_stats["decode_kept_blocks"],
                                                                      eager_stats["decode_blocks"])


@pytest.mark.parametrize("dense_steps_between", [False, True])
def test_eager_calls_after_compiled_steps_find_the_summaries_right(dense_steps_between, monkeypatch):
    """Prefill eager, decode compiled, decode eager again on the same cache (and, between, compiled
    steps that decode densely): the same logits as decoding eagerly throughout."""
    from transformers import StaticCache

    _, patched = _pair()
    ids = torch.randint(3, 96, (1, 100), generator=torch.Generator().manual_seed(5))
    sa.update_sparsity_config(patched, decode_selector="gate", decode_token_budget=32)
    torch._dynamo.reset()
    compiled_forward = torch.compile(patched.forward, backend="aot_eager", fullgraph=True)

    def logits(forward_of_step):
        cache = StaticCache(config=patched.config, max_cache_len=128)
        with torch.no_grad():
            patched(input_ids=ids[:, :40], past_key_values=cache)
            out = []
            for t in range(40, 100):
                forward, dense = forward_of_step(t)
                sa.update_sparsity_config(patched, decode_selector=None if dense else "gate")
                out.append(forward(input_ids=ids[:, t:t + 1], past_key_values=cache,
                                   position_ids=torch.tensor([[t]]), cache_position=torch.tensor([t])).logits)
        return torch.cat(out)

    def eager_only(t):
        return patched, dense_steps_between and 60 <= t < 75

    def mixed(t):  # compiled through two block completions, then eager
        return (compiled_forward if t < 80 else patched), dense_steps_between and 60 <= t < 75

    torch.testing.assert_close(logits(mixed), logits(eager_only), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["gate", "quest"])
def test_decoding_under_cuda_graphs_matches_eager(selector):
    """generate() with a static cache and torch.compile(mode="reduce-overhead"): the Triton decode
    kernel runs inside CUDA graphs and decodes what eager decoding does."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, patched = _pair(head_dim=64, num_heads=8, num_kv_heads=2)
    patched.cuda()
    ids, mask = (x.cuda() for x in _prompt(length=300))
    sa.update_sparsity_config(patched, decode_selector=selector, decode_token_budget=128)
    eager = _generate(patched, ids, mask, cache_implementation="static")
    torch._dynamo.reset()
    compiled = _generate(patched, ids, mask, cache_implementation="static", compile_config=_compile_config("inductor"))
    assert torch.equal(compiled, eager)
