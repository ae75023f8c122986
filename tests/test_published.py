"""The gates the SeerAttention authors published: folders written here in their exact layout load
through the public API, compute what an independent reference of their computation computes, convert
to safetensors with identical outputs, and unsafe or malformed files are refused.

The reference below is written from docs/published-gates.md (shared docs) with plain torch: it uses
no seerattn_hf code, only the base model's own rotary-embedding class for the block RoPE (which is
what the published code uses too).
"""

import copy
import json
import math
import pathlib
import re

import pytest
import torch
from model_factory import tiny_model
from transformers import AutoModelForCausalLM

import seerattn_hf as sa
from seerattn_hf.adapter import CONFIG_NAME, WEIGHTS_NAME, gate_state_dict
from seerattn_hf.convert import main as convert_main
from seerattn_hf.selectors import select_blocks

BLOCK = 16
LENGTH = 392  # 24 full blocks and a partial one
KEY = "model.layers.{}.self_attn.attn_gate.mask_linear_{}.weight"
ROPE_VARIANTS = {
    "default": None,
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
}
MODELS = [("llama", "default"), ("llama", "llama3"), ("qwen2", "default"), ("qwen2", "yarn"), ("qwen3", "default")]
# (seerattn_gate_type, seerattn_gate_hidden_size, seerattn_gate_force_double); tiny models have head_dim 16.
LAYOUTS = {
    "no-q-projection": ("Qavg_Kmaxminavg", 16, False),
    "force-double": ("Qavg_Kmaxminavg", 16, True),
    "two-q-poolings-wider": ("Qavgmax_Kmaxmin", 32, False),
}


def base_model(model_type, rope="default", dtype=torch.float32):
    model = tiny_model(model_type, dtype=dtype)
    if ROPE_VARIANTS[rope] is None:
        return model
    config = copy.deepcopy(model.config)
    config.rope_parameters = ROPE_VARIANTS[rope]
    rebuilt = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.eval()


def poolings(gate_type):
    q_part, k_part = gate_type[1:].split("_K")
    return re.findall("max|min|avg", q_part), re.findall("max|min|avg", k_part)


def write_published_gates(folder, model, gate_type="Qavg_Kmaxminavg", hidden=16, force_double=False,
                          method="threshold", threshold=0.01, nz_ratio=0.5, last_block_dense=True,
                          base_model_id="org/tiny-base"):
    """A folder as the paper's code writes it: config.json (the base model's config with the seerattn_*
    settings and base_model) and attn_gate_weights.pth (random bf16 tensors, real key names and shapes)."""
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_kinds, k_kinds = poolings(gate_type)
    # published-gates.md: mask_linear_q exists only with several Q poolings, a gate width other than
    # head_dim, or force_double; without it mask_linear_k has one matrix per query head.
    has_q = len(q_kinds) > 1 or hidden != head_dim or force_double
    tensors = {}
    for layer in range(config.num_hidden_layers):
        if has_q:
            tensors[KEY.format(layer, "q")] = torch.randn(heads, head_dim * len(q_kinds), hidden) * 4 / head_dim ** 0.5
        k_heads = kv_heads if has_q else heads
        tensors[KEY.format(layer, "k")] = torch.randn(k_heads, head_dim * len(k_kinds), hidden) * 4 / head_dim ** 0.5
    tensors = {key: tensor.to(torch.bfloat16) for key, tensor in tensors.items()}
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, folder / "attn_gate_weights.pth")
    values = json.loads(config.to_json_string())
    values.update(seerattn_sparsity_method=method, seerattn_threshold=threshold, seerattn_nz_ratio=nz_ratio,
                  seerattn_gate_type=gate_type, seerattn_gate_block_size=BLOCK, seerattn_gate_hidden_size=hidden,
                  seerattn_last_block_dense=last_block_dense, seerattn_gate_force_double=force_double,
                  base_model=base_model_id)
    (folder / "config.json").write_text(json.dumps(values))
    return tensors


# ------------------------------------------------------------------ the reference, from published-gates.md

def reference_scores(model, tensors, layer, query, key, gate_type, hidden):
    """Masked gate scores `[B, HQ, NB, NB]` of the published prefill gate, in the states' dtype.

    query `[B, T, HQ, D]`, key `[B, T, HKV, D]`: pre-RoPE outputs of q_proj / k_proj (Qwen3: of q_norm /
    k_norm). The whole gate runs in the model's dtype, as in the paper's code.
    """
    dtype = query.dtype
    batch, length, heads, head_dim = query.shape
    group = heads // key.shape[2]
    blocks = math.ceil(length / BLOCK)
    q_kinds, k_kinds = poolings(gate_type)

    def pool(states, kinds):
        # 1. Blocks of BLOCK tokens along the sequence; the partial last block pools its real tokens only.
        # The paper's avg_pool3d accumulates in float32 and rounds once to the dtype.
        pooled = []
        for j in range(blocks):
            chunk = states[:, j * BLOCK:(j + 1) * BLOCK].float()
            kinds_pooled = {"avg": chunk.mean(1), "max": chunk.amax(1), "min": chunk.amin(1)}
            pooled.append(torch.cat([kinds_pooled[kind] for kind in kinds], dim=-1))
        return torch.stack(pooled, dim=1).to(dtype)  # [B, NB, H, D * kinds]

    pooled_q, pooled_k = pool(query, q_kinds), pool(key, k_kinds)
    weight_q = tensors.get(KEY.format(layer, "q"))
    weight_k = tensors[KEY.format(layer, "k")].to(dtype)
    # 2. Q: no projection when the file has none. K: repeated to the query heads (query head i uses KV
    # head i // G) before a per-query-head projection, or projected per KV head and repeated after.
    to_query_heads = [i // group for i in range(heads)]
    if weight_q is None:
        gate_q = pooled_q
        gate_k = torch.einsum("bshi,hio->bsho", pooled_k[:, :, to_query_heads], weight_k)
    else:
        gate_q = torch.einsum("bshi,hio->bsho", pooled_q, weight_q.to(dtype))
        gate_k = torch.einsum("bshi,hio->bsho", pooled_k, weight_k)
    # 3. Block RoPE with the base model's own rope settings, rotary width = the gate width, at each
    # block's first token, rotate-half convention.
    rope_config = copy.deepcopy(model.config)
    rope_config.head_dim = hidden
    rotary = type(model.model.rotary_emb)(config=rope_config)
    cos, sin = rotary(gate_q, torch.arange(blocks)[None] * BLOCK)  # [1, NB, hidden] in dtype
    cos, sin = cos[:, :, None], sin[:, :, None]

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    gate_q, gate_k = rotate(gate_q), rotate(gate_k)
    if gate_k.shape[2] < heads:
        gate_k = gate_k[:, :, to_query_heads]
    # 4. q . k * hidden ** -0.5; key blocks after the query block masked.
    scores = torch.matmul(gate_q.transpose(1, 2), gate_k.transpose(1, 2).transpose(-1, -2)) * hidden ** -0.5
    future = torch.ones(blocks, blocks, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf"))


def reference_mask(scores, probs, method, value, last_block_dense=True):
    """The paper's selection: threshold keeps p > t (compared in the gate's dtype); nz_ratio keeps the top
    k = int((1 - sqrt(1 - nz)) * NB) raw scores of every row (at least one); the last two query-block
    rows dense; the diagonal not forced."""
    blocks = scores.shape[-1]
    if method == "threshold":
        keep = probs > value
    else:
        k = max(1, int((1 - math.sqrt(1 - value)) * blocks))
        keep = torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, scores.topk(k, dim=-1).indices, True)
    if last_block_dense:
        keep[..., -2:, :] = True
    return keep & torch.ones(blocks, blocks, dtype=torch.bool).tril()


def with_best_block_in_empty_rows(mask, probs):
    """Our one documented departure: a row the paper's rule leaves empty (its kernel returns NaN there)
    keeps its most probable block (the first of equals)."""
    best = torch.zeros_like(mask).scatter(-1, probs.argmax(dim=-1, keepdim=True), True)
    return mask | (best & ~mask.any(dim=-1, keepdim=True))


def assert_masks_agree(ours, reference, scores, probs, method, value, rtol):
    """Equal wherever the published rule decides by more than the relative rounding error `rtol`. Near a
    threshold, or at a top-k boundary between two scores that close (ties included), either choice is
    right, and the row must keep as many blocks as the reference. Such places must be rare."""
    if method == "threshold":
        unclear = (probs.float() - value).abs() <= rtol * value
        assert not ((ours != reference) & ~unclear).any()
        assert unclear.float().mean() < 0.05
        return
    blocks = scores.shape[-1]
    ranked = scores.float().sort(dim=-1, descending=True).values
    kept = reference.sum(dim=-1)
    unclear_rows = 0
    for index in (kept < torch.arange(1, blocks + 1)).nonzero().tolist():
        row = tuple(index)
        above, below = ranked[row + (int(kept[row]) - 1,)], ranked[row + (int(kept[row]),)]
        if above - below <= rtol * above.abs() + 1e-6:
            unclear_rows += 1  # bf16 scores tie often: 8 bits of mantissa
            assert scores[row][ours[row]].float().min() >= below - rtol * below.abs() - 1e-6, index
        else:
            assert torch.equal(ours[row], reference[row]), index
    assert torch.equal(ours.sum(-1), kept)
    assert unclear_rows <= 0.25 * kept.numel()


# --------------------------------------------------------------------------------------------- the tests

def _record_gate_inputs(model):
    """Forward hooks that record each layer's pre-RoPE query and key states `[B, T, H, D]`."""
    records, handles = {}, []
    for layer, block in enumerate(model.model.layers):
        attention = block.self_attn
        for side, name in (("q", "q_norm"), ("k", "k_norm")) if model.config.model_type == "qwen3" else \
                (("q", "q_proj"), ("k", "k_proj")):
            def hook(_module, _inputs, output, layer=layer, side=side):
                records[layer, side] = output.detach().view(*output.shape[:2], -1, attention.head_dim)
            handles.append(getattr(attention, name).register_forward_hook(hook))
    return records, handles


SETTINGS = [("threshold", 0.02), ("threshold", 0.1), ("nz_ratio", 0.3), ("nz_ratio", 0.6)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_type, rope", MODELS, ids=[f"{m}-{r}" for m, r in MODELS])
def test_gates_compute_what_the_published_code_computes(tmp_path, model_type, rope, layout, dtype):
    gate_type, hidden, force_double = LAYOUTS[layout]
    model = base_model(model_type, rope, dtype)
    tensors = write_published_gates(tmp_path, model, gate_type, hidden, force_double)
    model = sa.from_pretrained(tmp_path, model=model)
    assert model.seer_config.compute_dtype == "model"
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5  # two bf16 roundings; float32 accumulation order
    input_ids = torch.randint(0, 96, (1, LENGTH))
    records, handles = _record_gate_inputs(model)
    for method, value in SETTINGS:
        sa.update_sparsity_config(model, sparsity_method=method, **{method: value})
        sa.reset_sparsity_stats(model)
        with torch.no_grad():
            model(input_ids)
        kept_by_our_masks = 0
        for layer, block in enumerate(model.model.layers):
            query, key = records[layer, "q"], records[layer, "k"]
            scores = reference_scores(model, tensors, layer, query, key, gate_type, hidden)
            probs = scores.softmax(dim=-1)
            ours = block.self_attn.seer_gate(query, key, probabilities=True)
            assert ours.dtype == dtype
            torch.testing.assert_close(ours.float(), probs.float(), rtol=rtol, atol=0)
            # What the forward selects from: the softmax for a threshold, float32 log-probabilities to rank.
            selected_from = block.self_attn.seer_gate(query, key, probabilities=method == "threshold")
            our_mask = select_blocks(model.seer_config.policy, selected_from)
            expected = with_best_block_in_empty_rows(reference_mask(scores, probs, method, value), probs)
            assert_masks_agree(our_mask, expected, scores, probs, method, value, rtol)
            kept_by_our_masks += int(our_mask.sum())
        # The forward itself selected those blocks (through the kept-block lists the kernels read).
        assert sa.get_sparsity_stats(model)["kept_blocks"] == kept_by_our_masks
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("method, value", [("threshold", 0.1), ("nz_ratio", 0.3)])
def test_a_left_padded_batch_selects_as_each_sequence_alone(tmp_path, method, value):
    write_published_gates(tmp_path, tiny_model("qwen2"), method=method, **{method: value})
    model = sa.from_pretrained(tmp_path, model=tiny_model("qwen2"))
    lengths = [LENGTH, 150, 30]
    sequences = [torch.randint(1, 96, (n,)) for n in lengths]
    input_ids = torch.zeros(len(lengths), LENGTH, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), LENGTH, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, LENGTH - len(sequence):], attention_mask[row, LENGTH - len(sequence):] = sequence, 1
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask).logits
        for row, sequence in enumerate(sequences):
            alone = model(sequence[None]).logits[0]
            torch.testing.assert_close(padded[row, LENGTH - len(sequence):], alone, rtol=1e-4, atol=1e-4)
    assert sa.get_sparsity_stats(model)["density"] < 0.9


def test_the_published_settings_become_our_config(tmp_path):
    write_published_gates(tmp_path, tiny_model("llama"), method="nz_ratio", nz_ratio=0.3, last_block_dense=True)
    model = sa.from_pretrained(tmp_path, model=tiny_model("llama"))
    config = model.seer_config
    assert (config.block_size, config.gate_hidden_size, config.q_pooling, config.k_pooling) == \
        (BLOCK, 16, ["avg"], ["max", "min", "avg"])
    assert (config.q_projection, config.k_projection, config.compute_dtype) == (False, "query_head", "model")
    assert (config.sparsity_method, config.nz_ratio, config.keep_diagonal, config.dense_last_query_blocks) == \
        ("nz_ratio", 0.3, False, 2)
    assert config.base_model_name_or_path == "org/tiny-base"
    overridden = sa.from_pretrained(tmp_path, model=tiny_model("llama"), sparsity_method="threshold", threshold=2e-3,
                                    compute_dtype="float32")
    assert (overridden.seer_config.threshold, overridden.seer_config.compute_dtype) == (2e-3, "float32")
    with pytest.raises(ValueError, match="fixed by the saved gates"):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"), k_projection="kv_head")


def test_the_base_model_named_in_config_json_is_loaded(tmp_path, monkeypatch):
    write_published_gates(tmp_path, tiny_model("qwen2"), base_model_id="Qwen/Qwen2.5-7B-Instruct")
    calls = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda name, **kwargs: calls.append((name, kwargs)) or tiny_model("qwen2", dtype=torch.bfloat16))
    model = sa.from_pretrained(tmp_path, model_kwargs={"dtype": torch.bfloat16})
    assert calls == [("Qwen/Qwen2.5-7B-Instruct", {"dtype": torch.bfloat16})]
    stored = torch.load(tmp_path / "attn_gate_weights.pth", weights_only=True)
    assert torch.equal(model.model.layers[1].self_attn.seer_gate.k_weight, stored[KEY.format(1, "k")].float())
    assert model.model.layers[1].self_attn.seer_gate.q_weight is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["no-q-projection", "two-q-poolings-wider"])
def test_the_converted_adapter_gives_identical_outputs(tmp_path, layout, dtype):
    gate_type, hidden, force_double = LAYOUTS[layout]
    write_published_gates(tmp_path / "published", tiny_model("qwen3"), gate_type, hidden, force_double)
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    convert_main([str(tmp_path / "published"), str(tmp_path / "converted")])
    converted = tmp_path / "converted"
    assert sorted(p.name for p in converted.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert "seerattn-convert" in (converted / "README.md").read_text()
    base = tiny_model("qwen3", dtype=dtype)
    published = sa.from_pretrained(tmp_path / "published", model=copy.deepcopy(base))
    ours = sa.from_pretrained(converted, model=copy.deepcopy(base))
    assert ours.seer_config == published.seer_config
    assert all(torch.equal(a, b) for a, b in zip(gate_state_dict(published).values(), gate_state_dict(ours).values()))
    input_ids = torch.randint(0, 96, (2, LENGTH))
    for method, value in SETTINGS:
        for model in (published, ours):
            sa.update_sparsity_config(model, sparsity_method=method, **{method: value})
        with torch.no_grad():
            assert torch.equal(published(input_ids).logits, ours(input_ids).logits)


def test_converting_our_own_adapter_is_refused(tmp_path):
    model = sa.apply_seer_attention(tiny_model("llama"), sa.SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    sa.save_gates(model, tmp_path / "ours")
    with pytest.raises(ValueError, match="found a seerattn_hf adapter.*nothing to convert"):
        sa.convert_published_gates(tmp_path / "ours", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="seerattn-convert: error: .*is not a SeerAttention gate adapter"):
        convert_main([str(tmp_path / "empty"), str(tmp_path / "out")])


def _rewrite(folder, change):
    tensors = torch.load(folder / "attn_gate_weights.pth", weights_only=True)
    change(tensors)
    torch.save(tensors, folder / "attn_gate_weights.pth")


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path, monkeypatch):
    write_published_gates(tmp_path, tiny_model("llama"))
    _rewrite(tmp_path, lambda t: t.pop(KEY.format(1, "k")))
    with pytest.raises(ValueError, match=re.escape(f"missing ['{KEY.format(1, 'k')}'], unexpected []")):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))

    write_published_gates(tmp_path, tiny_model("llama"))
    _rewrite(tmp_path, lambda t: t.update({KEY.format(1, "q"): torch.zeros(4, 16, 16, dtype=torch.bfloat16)}))
    with pytest.raises(ValueError, match=re.escape(f"missing [], unexpected ['{KEY.format(1, 'q')}']")):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))

    write_published_gates(tmp_path, tiny_model("llama"))
    # One matrix per KV head where the published layout without a Q projection has one per query head.
    _rewrite(tmp_path, lambda t: t.update({KEY.format(0, "k"): torch.zeros(2, 48, 16, dtype=torch.bfloat16)}))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the base model was loaded before the gate file was checked"))
    message = f"wrong shape: {KEY.format(0, 'k')}: file (2, 48, 16), model (4, 48, 16)"
    with pytest.raises(ValueError, match=re.escape(message)):
        sa.from_pretrained(tmp_path)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=re.escape(message)):
        sa.from_pretrained(tmp_path, model=model)
    assert "seer_config" not in vars(model) and model.config._attn_implementation == "sdpa"


def test_gates_for_another_model_fail_clearly(tmp_path):
    write_published_gates(tmp_path, tiny_model("llama"))
    with pytest.raises(ValueError, match="trained for another model.*model_type: gates 'llama', model 'qwen2'"):
        sa.from_pretrained(tmp_path, model=tiny_model("qwen2"))


class WritesAMarker:
    """Unpickling this runs `Path.touch(marker)`: what a malicious .pth does with `__reduce__`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_pth_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    write_published_gates(tmp_path, tiny_model("llama"))
    marker = tmp_path / "code-ran"
    _rewrite(tmp_path, lambda t: t.update({"payload": WritesAMarker(marker)}))
    with pytest.raises(ValueError, match=r"attn_gate_weights.pth: expected a dict of tensors that "
                                         r"torch.load\(weights_only=True\) reads; refused"):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))
    with pytest.raises(SystemExit, match="refused"):
        convert_main([str(tmp_path), str(tmp_path / "converted")])
    assert not marker.exists() and not (tmp_path / "converted").exists()
    torch.load(tmp_path / "attn_gate_weights.pth", weights_only=False)  # the payload is real:
    assert marker.exists()


@pytest.mark.parametrize("content, found", [
    ({KEY.format(0, "k"): "not a tensor"}, "entries that are not tensors \\('model.layers.0.self_attn.attn_gate"
                                           ".mask_linear_k.weight': str\\)"),
    ([torch.zeros(2)], "expected a dict of tensors, found a list"),
])
def test_a_pth_holding_anything_but_a_dict_of_tensors_is_refused(tmp_path, content, found):
    write_published_gates(tmp_path, tiny_model("llama"))
    torch.save(content, tmp_path / "attn_gate_weights.pth")
    with pytest.raises(ValueError, match=found):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))


def test_malformed_published_folders_fail_clearly(tmp_path):
    write_published_gates(tmp_path, tiny_model("llama"), gate_type="Qavg_Kmedian")
    with pytest.raises(ValueError, match="seerattn_gate_type: expected 'Q<poolings>_K<poolings>'.*'Qavg_Kmedian'"):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))
    write_published_gates(tmp_path, tiny_model("llama"), method="topk")
    with pytest.raises(ValueError, match="seerattn_sparsity_method: expected 'threshold' or 'nz_ratio', found 'topk'"):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))
    write_published_gates(tmp_path, tiny_model("llama"), method="threshold", threshold=2.0)
    with pytest.raises(ValueError, match=r"config.json: its seerattn_\* settings give SparsityPolicy.threshold"):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))
    write_published_gates(tmp_path / "other", tiny_model("llama"))
    (tmp_path / "other" / "attn_gate_weights.pth").unlink()
    with pytest.raises(FileNotFoundError, match="holds no attn_gate_weights.pth"):
        sa.from_pretrained(tmp_path / "other", model=tiny_model("llama"))


def test_decode_gates_are_refused_by_name(tmp_path):
    write_published_gates(tmp_path, tiny_model("qwen3"))
    values = json.loads((tmp_path / "config.json").read_text())
    values.update(seerattn_token_budget=4096, seerattn_q_head_pooling_type="Qproj")
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="SeerAttention-R decode gates .*seerattn_q_head_pooling_type.*prefill gates only"):
        sa.from_pretrained(tmp_path, model=tiny_model("qwen3"))


def test_a_layout_that_cannot_fit_the_model_leaves_it_unchanged():
    model = tiny_model("llama")
    config = sa.SeerAttentionConfig(block_size=16, gate_hidden_size=8, q_projection=False, k_projection="query_head")
    with pytest.raises(ValueError, match="head_dim 16 with q_projection=False"):
        sa.apply_seer_attention(model, config)
    assert "seer_config" not in vars(model) and not hasattr(model.model.layers[0].self_attn, "seer_state")
