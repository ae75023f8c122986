"""Host cost of eager sparse decoding: the dispatcher ops one decoding step spends per layer on the
selection (bounded, so a regression fails), and the optionally compiled selection, which must pick
the same blocks as the plain one and must not recompile as the blocks grow."""

import collections

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

import seerattn_hf as sa
import seerattn_hf.attention as attention
import seerattn_hf.decode_attention as decode_attention
from seerattn_hf.decode_gate import DecodeGateConfig, SeerDecodeGate

# Measured: gate 35, quest 30.25 per layer (4 layers, the first of which computes what the layers of a
# step share); before the shared step tensors and the leaner selection, 71 and 53.
OP_BOUNDS = {"gate": 36, "quest": 32}
LAYERS = 4


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inside, self.ops = False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += self.inside
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("selector", ["gate", "quest"])
def test_a_sparse_decoding_step_spends_few_host_ops_per_layer(selector, monkeypatch):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(decode_gate=DecodeGateConfig(block_size=16,
                                                                                        gate_hidden_size=16)))
    sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, decode_selector=selector, decode_token_budget=64)
    counter = _Count()
    step = decode_attention.sparse_decode_step

    def counted(*args, **kwargs):
        counter.inside = True
        try:
            return step(*args, **kwargs)
        finally:
            counter.inside = False

    # The decode kernel is one launch whatever the selection; stubbed, the count is the selection's.
    monkeypatch.setattr(decode_attention, "sparse_decode_attention", lambda query, *args: torch.zeros_like(query))
    monkeypatch.setattr(attention, "sparse_decode_step", counted)
    ids = torch.randint(2, 100, (3, 100))
    cache = sa.GrowableCache(config=config, initial_capacity=160)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = ids[:, -1:]
        for _ in range(2):
            model(input_ids=token, past_key_values=cache, use_cache=True)
        with counter:
            model(input_ids=token, past_key_values=cache, use_cache=True)
    per_layer = counter.ops / LAYERS
    assert 0 < per_layer <= OP_BOUNDS[selector], per_layer


def _gate(size, heads=8, kv_heads=2, dim=16, hidden=32):
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hidden, 2).float() / hidden))
    gate = SeerDecodeGate(heads, kv_heads, dim, DecodeGateConfig(block_size=size, gate_hidden_size=hidden), inv_freq)
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.normal_()
    return gate


@pytest.mark.parametrize("method, keep_first_block", [("token_budget", False), ("token_budget", True),
                                                       ("threshold", False)])
def test_the_compiled_selection_picks_the_plain_blocks_without_recompiling_per_step(method, keep_first_block):
    size, heads, kv_heads, dim = 16, 8, 2, 16
    gate = _gate(size, heads, kv_heads, dim)
    torch._dynamo.reset()
    counters.clear()
    decode_attention.compile_selection(True, backend="aot_eager", devices=("cpu",))
    try:
        cpu = torch.device("cpu")
        compiled = {plain: decode_attention.COMPILED_SELECTION.function(plain, cpu)
                    for plain in (decode_attention.gate_block_lists, decode_attention.quest_block_lists)}
        assert all(compiled[plain] is not plain for plain in compiled)
        generator = torch.Generator().manual_seed(1)
        graphs = []
        for batch, capacity in ((3, 8), (3, 24), (2, 24)):  # cache growth, a new batch
            gate_keys = torch.randn(batch, kv_heads, capacity + 1, 32, generator=generator)
            key_max = torch.randn(batch, kv_heads, capacity + 1, dim, generator=generator).bfloat16()
            key_min = key_max - 1
            for num_blocks in range(1, capacity + 1):
                lens = torch.randint((num_blocks - 1) * size + 1, num_blocks * size + 1, (batch,), generator=generator)
                positions = (lens - 1)[:, None]
                lists = ((lens - 1) // size, size, method, 4 * size, 0.05, keep_first_block)
                query = torch.randn(batch, 1, heads, dim, generator=generator).bfloat16()
                newest = torch.randn(batch, heads, dim, generator=generator).bfloat16()
                inputs = {decode_attention.gate_block_lists: (gate, query, positions, gate.query_rope(positions),
                                                              gate_keys),
                          decode_attention.quest_block_lists: (newest, key_max, key_min)}
                with torch.inference_mode():
                    for plain, args in inputs.items():
                        expected = plain(*args, num_blocks, *lists)
                        got = compiled[plain](*args, num_blocks, *lists)
                        for want, have in zip(expected, got):
                            assert want.dtype == have.dtype and torch.equal(want, have), (plain.__name__, num_blocks)
                graphs.append(counters["stats"]["unique_graphs"])
        # Per function: a graph for one block (a size of 1 is specialised), one while the budget's
        # width is the block count, one for every later step, block count, cache capacity or batch.
        assert graphs[-1] <= 6, graphs
        assert graphs[2] == graphs[-1], graphs
    finally:
        decode_attention.compile_selection(False)
        torch._dynamo.reset()


def test_the_compiled_selection_stays_off_where_it_does_not_apply(monkeypatch):
    plain = decode_attention.gate_block_lists
    decode_attention.compile_selection(False)
    assert decode_attention.COMPILED_SELECTION.function(plain, torch.device("cuda")) is plain  # off by default
    decode_attention.compile_selection(True)
    try:
        assert decode_attention.COMPILED_SELECTION.function(plain, torch.device("cpu")) is plain  # CUDA only
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # under an outer torch.compile
        assert decode_attention.COMPILED_SELECTION.function(plain, torch.device("cuda")) is plain
    finally:
        decode_attention.compile_selection(False)
