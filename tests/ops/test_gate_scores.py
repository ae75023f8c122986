"""The fused gate scoring kernel (interpreter on CPU) against its torch reference, and the reference
against a loop over rows and key blocks."""

import math

import pytest
import torch
from attn_testing import device, rel_rms

from seerattn_hf.blocks import query_block_diagonals
from seerattn_hf.ops.gate_scores import block_rope, naive_gate_scores, triton_gate_scores

# (B, HQ, HK, h, query length, key length, block size, left padding)
CASES = [
    (1, 4, 1, 32, 200, 200, 16, False),  # a whole prompt, partial last block, GQA 4:1
    (2, 4, 2, 64, 77, 300, 16, True),  # a chunk starting inside a block, padding: a diagonal per sequence
    (1, 2, 2, 32, 1000, 1000, 16, False),  # more rows and key blocks than one tile
    (2, 8, 2, 128, 130, 130, 64, True),
]


def case_id(case):
    B, HQ, HK, h, TQ, T, bs, pad = case
    return f"B{B}-HQ{HQ}-HK{HK}-h{h}-TQ{TQ}-T{T}-bs{bs}" + ("-pad" if pad else "")


def make_case(case, dev="cpu"):
    B, HQ, HK, h, TQ, T, bs, pad = case
    offsets = torch.tensor([0, 37])[:B] if pad else None
    diagonal, _ = query_block_diagonals(TQ, T, bs, offsets, B, torch.device(dev))
    blocks = -(-T // bs)
    gate_q = torch.randn(B, HQ, diagonal.shape[1], h, device=dev)
    gate_k = torch.randn(B, HK, blocks, h, device=dev)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, h, 2, device=dev).float() / h))
    return gate_q, gate_k, diagonal, inv_freq, bs


def test_reference_matches_a_loop():
    gate_q, gate_k, diagonal, inv_freq, bs = make_case(CASES[1])
    log_probs = naive_gate_scores(gate_q, gate_k, diagonal, inv_freq, bs, 1.5, "log_softmax")
    groups = gate_q.shape[1] // gate_k.shape[1]
    for b in range(gate_q.shape[0]):
        for h in range(gate_q.shape[1]):
            for r in (0, 3, gate_q.shape[2] - 1):
                i = int(diagonal[b, r])
                q = block_rope(gate_q[b, h, r][None, None, None], torch.tensor([[i]]), inv_freq, bs, 1.5)[0, 0, 0]
                blocks = torch.arange(gate_k.shape[2])[None]
                keys = block_rope(gate_k[b, h // groups][None, None], blocks, inv_freq, bs, 1.5)[0, 0, : i + 1]
                expected = (keys @ q / math.sqrt(q.shape[0])).log_softmax(0)
                torch.testing.assert_close(log_probs[b, h, r, : i + 1], expected)
                assert (log_probs[b, h, r, i + 1:] == float("-inf")).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("normalize", ["none", "softmax", "log_softmax"])
def test_triton_matches_naive(case, normalize, nan_empty):
    gate_q, gate_k, diagonal, inv_freq, bs = make_case(case, device())
    out = triton_gate_scores(gate_q, gate_k, diagonal, inv_freq, bs, 1.2, normalize)
    expected = naive_gate_scores(gate_q, gate_k, diagonal, inv_freq, bs, 1.2, normalize)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert rel_rms(out, expected) < 1e-5


def test_triton_rejects_bad_arguments():
    gate_q, gate_k, diagonal, inv_freq, bs = make_case(CASES[0], device())
    with pytest.raises(ValueError, match="float32"):
        triton_gate_scores(gate_q.half(), gate_k, diagonal, inv_freq, bs)
    with pytest.raises(ValueError, match="diagonal"):
        triton_gate_scores(gate_q, gate_k, diagonal[:, 1:], inv_freq, bs)
    with pytest.raises(ValueError, match="normalize"):
        triton_gate_scores(gate_q, gate_k, diagonal, inv_freq, bs, normalize="sigmoid")


@pytest.mark.gpu
def test_triton_matches_naive_at_128k_on_the_gpu():
    gate_q, gate_k, diagonal, inv_freq, bs = make_case((1, 32, 8, 128, 131072, 131072, 64, False), "cuda")
    out = triton_gate_scores(gate_q, gate_k, diagonal, inv_freq, bs, 1.0, "softmax")
    expected = naive_gate_scores(gate_q, gate_k, diagonal, inv_freq, bs, 1.0, "softmax")
    assert rel_rms(out, expected) < 1e-4


# (B, H, HW, D, h, x length, key length, block size, kinds, left padding)
PROJECTION_CASES = [
    (1, 4, 4, 16, 32, 77, 77, 16, ["avg"], None),  # query side, partial last block
    (2, 2, 2, 32, 16, 90, 90, 16, ["max", "min", "avg"], [0, 23]),  # key side, padding
    (2, 2, 4, 16, 16, 37, 130, 16, ["max", "avg"], [5, 0]),  # chunk inside a block, keys repeated to HW
    (1, 2, 2, 16, 32, 300, 300, 32, ["min"], None),  # more rows than one tile
]


def projection_id(case):
    B, H, HW, D, h, TX, T, bs, kinds, pad = case
    return f"B{B}-H{H}-HW{HW}-D{D}-h{h}-TX{TX}-T{T}-bs{bs}-{'+'.join(kinds)}" + ("-pad" if pad else "")


@pytest.mark.parametrize("case", PROJECTION_CASES, ids=projection_id)
def test_triton_projection_matches_naive(case, nan_empty):
    from seerattn_hf.ops.gate_scores import naive_gate_projection, triton_gate_projection

    B, H, HW, D, h, TX, T, bs, kinds, pad = case
    dev = device()
    x = torch.randn(B, TX, H * D, device=dev).view(B, TX, H, D)  # a projection's output, viewed per head
    weight = torch.randn(HW, D * len(kinds), h, device=dev)
    offsets = None if pad is None else torch.tensor(pad, device=dev)
    out = triton_gate_projection(x, weight, kinds, bs, T, offsets)
    expected = naive_gate_projection(x, weight, kinds, bs, T, offsets)
    assert out.shape == expected.shape
    assert rel_rms(out, expected) < 1e-5


def test_triton_projection_rejects_bad_arguments():
    from seerattn_hf.ops.gate_scores import triton_gate_projection

    x, weight = torch.randn(1, 40, 2, 16, device=device()), torch.randn(2, 32, 16, device=device())
    with pytest.raises(ValueError, match="weight"):
        triton_gate_projection(x, weight, ["avg"], 16, 40, None)  # 2 kinds of rows for 1 kind
    with pytest.raises(ValueError, match="float32"):
        triton_gate_projection(x, weight, ["avg", "max"], 16, 40, None, dtype=torch.bfloat16)
