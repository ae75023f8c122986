"""GrowableCache: buffers written in place hold what DynamicCache's concatenation holds, through every
cache operation generate() uses, unpatched and with sparse decoding."""

import inspect

import pytest
import torch
from model_factory import tiny_model

import seerattn_hf as sa
from seerattn_hf.decode_gate import DecodeGateConfig
from seerattn_hf.growable_cache import GrowableLayer


@pytest.fixture(autouse=True)
def _nan_spare_room(monkeypatch):
    """Fill the positions past each layer's length with NaN whenever buffers are allocated: any reader
    that looked past the views (SDPA, the key summaries, the decode kernel) would turn the outputs NaN."""
    for name in ("lazy_initialization", "_reallocate"):
        original = getattr(GrowableLayer, name)

        def poisoned(self, *args, _original=original):
            _original(self, *args)
            length = self.get_seq_length()
            self.key_buffer[:, :, length:] = float("nan")
            self.value_buffer[:, :, length:] = float("nan")

        monkeypatch.setattr(GrowableLayer, name, poisoned)


def _small_cache(config, **settings):
    """A cache that starts small and grows several times over a test's 30-odd new tokens."""
    return sa.GrowableCache(config=config, **{"min_growth": 4, "growth": 1.25, **settings})


def _model(model_type="llama", selector=None, budget=32):
    """A tiny random model; with `selector`, patched with decode gates and decoding sparsely (a
    32-token budget keeps 2 of the 16-token blocks: most of the cache is not read)."""
    torch.manual_seed(0)
    model = tiny_model(model_type)
    model.generation_config.pad_token_id = 0
    if selector is not None:
        config = sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=1.0,
                                        decode_gate=DecodeGateConfig(block_size=16, gate_hidden_size=16),
                                        decode_selector=selector, decode_token_budget=budget)
        sa.apply_seer_attention(model, config)
        with torch.no_grad():
            for parameter in sa.gate_parameters(model):
                parameter.normal_()
    return model


def _prompt(batch=2, length=37, padding=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :padding] = 0  # left padding
    return ids, mask


def _with_cache(model, cache) -> dict:
    """The cache as a keyword argument: `past_key_values` in transformers 5.17, `cache` in later versions."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _generate(model, ids, mask, cache=None, **kwargs):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, **_with_cache(model, cache),
                          **kwargs)


def test_growth_across_capacity_boundaries_holds_what_torch_cat_holds():
    layer = GrowableLayer(initial_capacity=0, growth=1.5, min_growth=3)
    keys, values = torch.empty(2, 3, 0, 8), torch.empty(2, 3, 0, 5)  # values of another head_dim
    capacities, moved = [], 0
    for tokens in [7] + [1] * 20 + [12] + [1] * 10 + [30] + [1] * 5:
        new_keys, new_values = torch.randn(2, 3, tokens, 8), torch.randn(2, 3, tokens, 5)
        buffer_before = layer.key_buffer
        got_keys, got_values = layer.update(new_keys, new_values)
        keys, values = torch.cat([keys, new_keys], -2), torch.cat([values, new_values], -2)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
        assert got_keys is layer.keys and got_values is layer.values and layer.get_seq_length() == keys.shape[2]
        assert got_keys.untyped_storage().data_ptr() == layer.key_buffer.untyped_storage().data_ptr()
        moved += buffer_before is not None and layer.key_buffer is not buffer_before
        capacities.append(layer.capacity)
    assert moved >= 4 and capacities == sorted(capacities)
    # Geometric: spare room of at most half the length (growth 1.5) or min_growth.
    assert layer.capacity <= 1.5 * keys.shape[2] + 3


def test_an_initial_capacity_covering_generation_never_moves_the_buffers(monkeypatch):
    model = _model()
    ids, mask = _prompt()
    moves = []
    monkeypatch.setattr(GrowableLayer, "_reallocate", lambda self, needed: moves.append(needed))
    cache = sa.GrowableCache(config=model.config, initial_capacity=ids.shape[1] + 30)
    _generate(model, ids, mask, cache)
    assert moves == [] and all(layer.capacity == ids.shape[1] + 30 for layer in cache.layers)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("selector", [None, "gate", "quest"])
def test_greedy_generation_equals_dynamic_cache_token_for_token(model_type, selector):
    model = _model(model_type, selector)
    ids, mask = _prompt()
    expected = _generate(model, ids, mask)
    cache = _small_cache(model.config)
    assert torch.equal(_generate(model, ids, mask, cache), expected)
    assert all(isinstance(layer, GrowableLayer) and layer.capacity > layer.get_seq_length() > ids.shape[1]
               for layer in cache.layers)
    if selector is not None:  # the sparse path ran, reading a part of the cache
        assert sa.get_sparsity_stats(model)["decode_density"] < 0.8


def test_layers_made_as_the_model_calls_them_without_a_config_are_growable():
    model = _model()
    ids, mask = _prompt()
    cache = sa.GrowableCache(min_growth=4)
    assert torch.equal(_generate(model, ids, mask, cache), _generate(model, ids, mask))
    assert len(cache.layers) == model.config.num_hidden_layers
    assert all(isinstance(layer, GrowableLayer) for layer in cache.layers)


@pytest.mark.parametrize("selector", [None, "gate"])
def test_beam_search_reorders_the_buffers_like_dynamic_cache(selector):
    model = _model(selector=selector)
    ids, mask = _prompt()
    assert torch.equal(_generate(model, ids, mask, _small_cache(model.config), num_beams=2),
                       _generate(model, ids, mask, num_beams=2))


@pytest.mark.parametrize("selector", [None, "gate"])
def test_assisted_decoding_crops_like_dynamic_cache(selector):
    model = _model(selector=selector)
    assistant = tiny_model("llama", num_layers=1)
    assistant.generation_config.pad_token_id = 0
    ids, mask = _prompt(batch=1, padding=0, length=45)
    assert torch.equal(_generate(model, ids, mask, _small_cache(model.config), assistant_model=assistant),
                       _generate(model, ids, mask, assistant_model=assistant))


@pytest.mark.parametrize("selector", [None, "quest"])
def test_a_cropped_cache_continues_like_a_fresh_one(selector):
    """Decode 10 tokens, crop 12 (across a block boundary and a capacity boundary), decode others: the
    logits of a cache that never held the cropped tokens."""
    model = _model(selector=selector)
    ids = torch.randint(3, 96, (1, 90), generator=torch.Generator().manual_seed(4))

    def logits(cache, crop):
        with torch.no_grad():
            model(input_ids=ids[:, :(50 if crop else 48)], **_with_cache(model, cache))
            if crop:
                for t in range(50, 60):
                    model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **_with_cache(model, cache))
                cache.crop(-12)
                assert cache.get_seq_length() == 48 and cache.layers[0].keys.shape[2] == 48
            return torch.cat([model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t - 12]]),
                                    **_with_cache(model, cache)).logits for t in range(60, 90)])

    torch.testing.assert_close(logits(_small_cache(model.config), crop=True),
                               logits(_small_cache(model.config), crop=False), rtol=0, atol=0)


def test_batch_operations_act_on_the_buffers_and_keep_the_spare_room():
    from transformers import DynamicCache

    grown, reference = sa.GrowableCache(min_growth=8), DynamicCache()
    for tokens in (5, 1, 1):
        states = (torch.randn(3, 2, tokens, 4), torch.randn(3, 2, tokens, 4))
        grown.update(*states, 0)
        reference.update(*states, 0)
    layer = grown.layers[0]
    for method, argument in (("reorder_cache", torch.tensor([2, 0, 1])), ("batch_repeat_interleave", 2),
                             ("batch_select_indices", torch.tensor([0, 3, 5]))):
        getattr(grown, method)(argument)
        getattr(reference, method)(argument)
        expected = reference.layers[0]
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)
        assert layer.capacity == 13 and layer.key_buffer.shape[0] == layer.keys.shape[0]
    states = (torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))  # then written in place as before
    assert torch.equal(grown.update(*states, 0)[0], reference.update(*states, 0)[0])


def test_reset_empties_the_layer_and_keeps_its_buffers_until_another_shape_comes():
    cache = sa.GrowableCache(min_growth=8)
    cache.update(torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4), 0)
    layer = cache.layers[0]
    buffer = layer.key_buffer
    cache.reset()
    assert cache.get_seq_length() == 0 and layer.keys.shape == (2, 2, 0, 4) and layer.key_buffer is buffer
    keys = torch.randn(2, 2, 3, 4)
    assert torch.equal(cache.update(keys, keys, 0)[0], keys) and layer.key_buffer is buffer
    cache.reset()
    other = torch.randn(5, 2, 3, 4, dtype=torch.float64)  # another batch and dtype: new buffers
    assert torch.equal(cache.update(other, other, 0)[0], other) and layer.key_buffer.shape[0] == 5


def test_early_initialization_allocates_the_initial_capacity():
    cache = sa.GrowableCache(config=tiny_model("llama").config, initial_capacity=64)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))
    assert [(layer.capacity, layer.get_seq_length()) for layer in cache.layers] == [(64, 0), (64, 0)]
    keys = torch.randn(2, 2, 5, 16)
    assert torch.equal(cache.update(keys, keys, 1)[0], keys) and cache.layers[1].capacity == 64


def test_cache_data_given_to_the_constructor_is_held_in_growable_layers():
    keys, values = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    cache = sa.GrowableCache([(keys, values), (keys + 1, values + 1)], min_growth=8)
    assert [type(layer) for layer in cache.layers] == [GrowableLayer, GrowableLayer]
    assert torch.equal(cache.layers[1].keys, keys + 1) and cache.layers[1].capacity == 15


def test_keys_assigned_from_outside_are_moved_into_new_buffers():
    layer = GrowableLayer(min_growth=8)
    first = torch.randn(1, 2, 4, 4)
    layer.update(first, first)
    layer.keys = layer.keys * 2  # not a view of the buffers any more
    new = torch.randn(1, 2, 1, 4)
    keys, values = layer.update(new, new)
    assert torch.equal(keys, torch.cat([first * 2, new], -2)) and torch.equal(values, torch.cat([first, new], -2))


def test_buffers_made_under_inference_mode_are_moved_when_an_update_comes_outside_it():
    layer = GrowableLayer(min_growth=8)
    first, new = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 1, 4)
    with torch.inference_mode():
        layer.update(first, first)
    with torch.no_grad():  # generate()'s mode: inference tensors cannot be written in place here
        keys, _ = layer.update(new, new)
    assert torch.equal(keys, torch.cat([first, new], -2)) and not layer.key_buffer.is_inference()


@pytest.mark.parametrize("setting, value, message", [
    ("initial_capacity", -1, "GrowableCache.initial_capacity: expected an int >= 0"),
    ("initial_capacity", 2.0, "GrowableCache.initial_capacity: expected an int >= 0"),
    ("growth", 0.5, "GrowableCache.growth: expected a number >= 1"),
    ("min_growth", 0, "GrowableCache.min_growth: expected an int >= 1"),
])
def test_bad_settings_are_refused_naming_the_field(setting, value, message):
    with pytest.raises(ValueError, match=message):
        sa.GrowableCache(**{setting: value})
    with pytest.raises(ValueError, match=message.replace("GrowableCache", "GrowableLayer")):
        GrowableLayer(**{setting: value})


def test_states_that_do_not_fit_the_cached_ones_are_refused_with_both_shapes():
    layer = GrowableLayer()
    layer.update(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4))
    with pytest.raises(ValueError, match=r"expected key_states \[B=2, H=2, T, D=4\] torch.float32 on cpu, like the "
                                         r"cached ones; found \(3, 2, 1, 4\) torch.float32"):
        layer.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    with pytest.raises(ValueError, match=r"expected value_states .* found \(2, 2, 1, 4\) torch.float64"):
        layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4, dtype=torch.float64))
    assert layer.get_seq_length() == 5  # a refused update changes nothing
    fresh = GrowableLayer()
    with pytest.raises(ValueError, match=r"expected key_states \[B, H, T, D\]; found shape \(2, 5, 4\)"):
        fresh.update(torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    assert not fresh.is_initialized and fresh.update(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4))[0].shape[2] == 5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def test_sdpa_reads_views_of_a_longer_buffer_as_their_copies(backend):
    """What the unpatched model runs on a GrowableCache: SDPA over `buffer[:, :, :length]`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    buffers = torch.randn(2, 4, 8, 1500, 128, device="cuda", dtype=torch.bfloat16)
    buffers[..., 1200:, :] = float("nan")
    q = torch.randn(4, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = buffers[0, :, :, :1200], buffers[1, :, :, :1200]
    with sdpa_kernel(getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                          "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend])):
        try:
            expected = torch.nn.functional.scaled_dot_product_attention(q, k.contiguous(), v.contiguous())
        except RuntimeError as error:
            pytest.skip(f"{backend} does not run here: {error}")
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("offloading", [False, True])
def test_on_cuda_the_triton_decode_path_decodes_like_dynamic_cache(offloading):
    """Sparse decoding through the Triton kernel over the views (and with the layers offloaded to the
    CPU between uses, which moves the whole buffers)."""
    from transformers import DynamicCache

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model(selector="gate").cuda()
    ids, mask = (x.cuda() for x in _prompt())
    expected = _generate(model, ids, mask, DynamicCache(config=model.config, offloading=offloading))
    cache = _small_cache(model.config, offloading=offloading)
    assert torch.equal(_generate(model, ids, mask, cache), expected)
    assert sa.get_sparsity_stats(model)["decode_density"] < 0.8
    last = cache.layers[-1]  # offloaded after its last update (the first layer is prefetched back by then)
    assert last.key_buffer.device.type == ("cpu" if offloading else "cuda")
    assert last.keys.untyped_storage().data_ptr() == last.key_buffer.untyped_storage().data_ptr()
