"""Sparse decoding attention: the torch reference against float64 masked attention and plain dense
attention, and the Triton split-KV kernel (interpreter on CPU) against the reference, on caches whose
unread positions are NaN (a kernel that reads any of them fails)."""

from __future__ import annotations

import pytest
import torch
from attn_testing import device, growing_keys, rel_rms

from seerattn_hf.ops.decode_attn import naive_sparse_decode_attention, triton_sparse_decode_attention

# (B, HQ, HKV, D, block_size, seq_lens, cache capacity S, kept blocks, new tokens TQ (None: a 3-D q),
# left padding). Kept blocks: "random" (a random subset in random order), "current" (the block of the
# newest token only), "all" (every block, shuffled), "holes" (random, but some heads keep nothing and
# some lists name blocks past the end or below 0), "dense" (block_idx None).
CASES = [
    (1, 4, 4, 16, 16, [1], 16, "random", None, False),
    (2, 8, 4, 32, 16, [77, 200], 256, "random", None, False),
    (3, 8, 2, 64, 32, [300, 33, 129], 320, "random", None, True),
    (2, 4, 1, 32, 16, [150, 97], 192, "current", None, True),
    (2, 8, 4, 16, 16, [200, 63], 256, "all", None, False),
    (2, 8, 2, 32, 16, [180, 50], 200, "holes", None, True),
    (2, 8, 2, 32, 32, [190, 121], 256, "dense", None, True),
    (2, 8, 2, 32, 16, [98, 50], 128, "random", 4, True),  # the 4 new tokens straddle two blocks
    (1, 4, 2, 128, 64, [257], 320, "random", 2, False),
    (2, 8, 4, 16, 16, [33, 160], 160, "dense", 3, False),  # S == the longest sequence
]


def case_id(case):
    B, HQ, HKV, D, bs, lens, S, kind, TQ, pad = case
    return (f"B{B}-S{S}-HQ{HQ}-HKV{HKV}-D{D}-bs{bs}-len{'_'.join(map(str, lens))}-{kind}"
            + (f"-TQ{TQ}" if TQ else "") + ("-pad" if pad else ""))


def make_lists(seq_lens, HKV, block_size, kind):
    """Kept-block lists [B, HKV, K] int32 (garbage after the counted entries) and counts [B, HKV]."""
    per_head = []
    for n in seq_lens.tolist():
        n_blocks = -(-n // block_size)
        for _ in range(HKV):
            if kind == "current":
                kept = torch.tensor([n_blocks - 1])
            elif kind == "all":
                kept = torch.randperm(n_blocks)
            else:
                kept = torch.randperm(n_blocks)[: int(torch.randint(1, n_blocks + 1, ()))]
            if kind == "holes" and torch.rand(()) < 0.3:
                kept = kept[:0]
            elif kind == "holes" and torch.rand(()) < 0.7:  # an index past the end, below 0, or both
                nothing = torch.tensor([n_blocks + 2, -1])[torch.randperm(2)[: int(torch.randint(1, 3, ()))]]
                kept = torch.cat([kept, nothing])
            per_head.append(kept)
    K = max(len(kept) for kept in per_head) + 2
    # after the counted entries: blocks of the sequence that are not kept (read, they would be NaN)
    idx = torch.randint(0, -(-int(seq_lens.max()) // block_size), (len(per_head), K))
    for row, kept in zip(idx, per_head):
        row[: len(kept)] = kept
    count = torch.tensor([len(kept) for kept in per_head])
    return idx.view(len(seq_lens), HKV, K).int(), count.view(len(seq_lens), HKV).int()


def read_positions(block_idx, block_count, block_size, seq_lens, seq_offsets, S, HKV):
    """[B, HKV, S] bool: the cache positions the spec reads (kept blocks inside the sequence)."""
    start = torch.zeros_like(seq_lens) if seq_offsets is None else seq_offsets
    rel = torch.arange(S) - start[:, None]  # [B, S], from each sequence's first token
    inside = ((rel >= 0) & (rel < seq_lens[:, None]))[:, None].expand(-1, HKV, -1)
    if block_idx is None:
        return inside
    n_blocks = -(-S // block_size)
    kept = torch.arange(block_idx.shape[-1]) < block_count[..., None]
    table = torch.zeros(*block_idx.shape[:2], n_blocks + 1, dtype=torch.bool)
    slot = torch.where(kept & (block_idx >= 0), block_idx.long(), n_blocks).clamp(max=n_blocks)
    table.scatter_(-1, slot, True)
    blk = (rel.clamp(min=0) // block_size).clamp(max=n_blocks)[:, None].expand(-1, HKV, -1)
    return inside & table.gather(-1, blk)


def make_case(case, dtype=torch.float32, dev="cpu"):
    """(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, seq_offsets, read)."""
    B, HQ, HKV, D, bs, lens, S, kind, TQ, pad = case
    seq_lens = torch.tensor(lens)
    offsets = (torch.rand(B) * (S - seq_lens + 1)).long() if pad else None
    q = torch.randn(B, HQ, *([TQ] if TQ else []), D)
    k, v = torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    idx, count = (None, None) if kind == "dense" else make_lists(seq_lens, HKV, bs, kind)
    read = read_positions(idx, count, bs, seq_lens, offsets, S, HKV)
    on = (lambda x: None if x is None else x.to(dev))
    return (q.to(dtype).to(dev), k.to(dtype).to(dev), v.to(dtype).to(dev), on(idx), on(count), bs,
            seq_lens.to(dev), on(offsets), read.to(dev))


def poison_unread(k, v, read):
    """The caches with NaN wherever the spec reads nothing (outside the sequence or its kept blocks)."""
    return k.masked_fill(~read[..., None], float("nan")), v.masked_fill(~read[..., None], float("nan"))


def masked_dense_float64(q, k, v, read, seq_lens, seq_offsets):
    """float64 attention over every cache position with the positions outside `read` masked, causal
    among the new tokens."""
    q4 = q[:, :, None] if q.dim() == 3 else q
    B, HQ, TQ, D = q4.shape
    G = HQ // k.shape[1]
    end = seq_lens + (0 if seq_offsets is None else seq_offsets)
    q_pos = end[:, None] - TQ + torch.arange(TQ)  # [B, TQ]
    causal = torch.arange(k.shape[2]) <= q_pos[:, None, :, None]
    allowed = read.repeat_interleave(G, 1)[:, :, None, :] & causal
    s = q4.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * D**-0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    o = (p @ v.double().repeat_interleave(G, 1)).transpose(1, 2)
    return o[:, 0] if q.dim() == 3 else o


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_naive_matches_masked_dense_float64(case):
    q, k, v, idx, count, bs, lens, offsets, read = make_case(case)
    o = naive_sparse_decode_attention(q, k, v, idx, count, bs, lens, seq_offsets=offsets)
    assert o.dtype == q.dtype
    assert o.shape == (q.shape if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
    assert rel_rms(o, masked_dense_float64(q, k, v, read, lens, offsets)) < 1e-5


@pytest.mark.parametrize("TQ", [None, 3])
def test_naive_every_block_kept_is_dense_attention(TQ):
    """Dense (block_idx None) and every-block lists give plain softmax attention over each
    sequence's own slice of the cache."""
    B, HQ, HKV, S, D, bs = 3, 8, 2, 200, 32, 16
    seq_lens, offsets = torch.tensor([200, 77, 5]), torch.tensor([0, 100, 3])
    q = torch.randn(B, HQ, *([TQ] if TQ else []), D)
    k, v = torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    q4 = q[:, :, None] if TQ is None else q
    expected = []
    for b in range(B):
        keys = k[b, :, offsets[b]:offsets[b] + seq_lens[b]].repeat_interleave(HQ // HKV, 0)
        values = v[b, :, offsets[b]:offsets[b] + seq_lens[b]].repeat_interleave(HQ // HKV, 0)
        s = q4[b] @ keys.transpose(-1, -2) * D**-0.5  # [HQ, TQ, L]
        tq, n = s.shape[1], s.shape[2]
        s = s.masked_fill(torch.arange(n) > n - tq + torch.arange(tq)[:, None], float("-inf"))
        expected.append((torch.softmax(s, -1) @ values).transpose(0, 1))
    expected = torch.stack(expected)
    expected = expected[:, 0] if TQ is None else expected
    every = torch.arange(-(-S // bs)).int().expand(B, HKV, -1)
    count = ((seq_lens + bs - 1) // bs).int()[:, None].expand(B, HKV)
    for idx, cnt in ((None, None), (every, count)):
        o = naive_sparse_decode_attention(q, k, v, idx, cnt, bs, seq_lens, seq_offsets=offsets)
        assert rel_rms(o, expected) < 1e-5


def assert_matches_reference(o, ref, dtype):
    assert o.dtype == dtype and o.shape == ref.shape
    assert rel_rms(o, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_naive(case, dtype, nan_empty):
    q, k, v, idx, count, bs, lens, offsets, read = make_case(case, dtype, device())
    k, v = poison_unread(k, v, read)
    o = triton_sparse_decode_attention(q, k, v, idx, count, bs, lens, seq_offsets=offsets)
    ref = naive_sparse_decode_attention(q, k, v, idx, count, bs, lens, seq_offsets=offsets)
    assert ref.isfinite().all()
    assert_matches_reference(o, ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
def test_triton_any_split_count(num_splits, nan_empty):
    """One split (final output written directly), a few, and more splits than kept blocks (empty
    splits must count for nothing in the merge)."""
    from seerattn_hf.ops.decode_attn.triton import sparse_decode_attn_fwd

    case = (2, 8, 2, 32, 16, [700, 40], 704, "all", 2, True)  # 44 blocks: more than 16 splits hold some
    q, k, v, idx, count, bs, lens, offsets, read = make_case(case, torch.float16, device())
    k, v = poison_unread(k, v, read)
    o = sparse_decode_attn_fwd(q, k, v, idx, count, bs, lens, seq_offsets=offsets, num_splits=num_splits)
    assert_matches_reference(o, naive_sparse_decode_attention(q, k, v, idx, count, bs, lens,
                                                              seq_offsets=offsets), torch.float16)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_triton_scores_growing_along_the_cache(dense, nan_empty):
    """Keys scaled up along the cache: the running maximum moves far within a split, and the splits'
    log-sum-exps differ by a lot in the merge."""
    from seerattn_hf.ops.decode_attn.triton import sparse_decode_attn_fwd

    case = (2, 4, 2, 32, 16, [240, 131], 240, "dense" if dense else "all", None, False)
    q, k, v, idx, count, bs, lens, offsets, _ = make_case(case, dev=device())
    k = growing_keys(k)
    o = sparse_decode_attn_fwd(q, k, v, idx, count, bs, lens, num_splits=3)
    assert_matches_reference(o, naive_sparse_decode_attention(q, k, v, idx, count, bs, lens),
                             torch.float32)


def test_triton_custom_scale_and_int64_lists(nan_empty):
    case = (2, 4, 2, 32, 16, [100, 61], 128, "random", None, True)
    q, k, v, idx, count, bs, lens, offsets, _ = make_case(case, dev=device())
    o = triton_sparse_decode_attention(q, k, v, idx.long(), count.long(), bs, lens, scale=0.05,
                                       seq_offsets=offsets)
    ref = naive_sparse_decode_attention(q, k, v, idx, count, bs, lens, scale=0.05, seq_offsets=offsets)
    assert_matches_reference(o, ref, torch.float32)


def test_triton_nothing_kept_gives_zeros(nan_empty):
    """Empty lists (K = 0) and zero counts: every output row is written, as 0."""
    q = torch.randn(2, 4, 16, device=device())
    k, v = (torch.randn(2, 2, 64, 16, device=device()) for _ in range(2))
    lens = torch.tensor([64, 30], device=device())
    for K in (0, 3):
        idx = torch.zeros(2, 2, K, dtype=torch.int32, device=device())
        count = torch.zeros(2, 2, dtype=torch.int32, device=device())
        o = triton_sparse_decode_attention(q, k, v, idx, count, 16, lens)
        assert torch.equal(o, torch.zeros_like(q))
        assert torch.equal(naive_sparse_decode_attention(q, k, v, idx, count, 16, lens), torch.zeros_like(q))


@pytest.mark.parametrize("kind", ["random", "dense"])
def test_a_view_of_a_longer_buffer_is_read_as_its_copy(kind, nan_empty):
    """A GrowableCache's layout: k_cache / v_cache are `buffer[:, :, :S]` of buffers with spare room
    (NaN here), so their strides are the buffer's; both paths read them in place, as their copies."""
    case = (2, 8, 2, 32, 16, [130, 77], 144, kind, 2, True)
    q, k, v, idx, count, bs, lens, offsets, _ = make_case(case, dev=device())
    buffers = torch.full((2, *k.shape[:2], k.shape[2] + 50, k.shape[3]), float("nan"), device=k.device)
    buffers[0, :, :, : k.shape[2]], buffers[1, :, :, : k.shape[2]] = k, v
    k_view, v_view = buffers[0, :, :, : k.shape[2]], buffers[1, :, :, : k.shape[2]]
    assert not k_view.is_contiguous()
    for attend in (naive_sparse_decode_attention, triton_sparse_decode_attention):
        o = attend(q, k_view, v_view, idx, count, bs, lens, seq_offsets=offsets)
        assert o.isfinite().all()
        assert torch.equal(o, attend(q, k, v, idx, count, bs, lens, seq_offsets=offsets)), attend.__name__


def test_split_count_follows_list_width_and_batch():
    from seerattn_hf.ops.decode_attn.triton import MIN_BLOCKS_PER_SPLIT, split_count

    cpu = torch.device("cpu")
    assert split_count(1, 1, cpu) == 1
    assert split_count(1, 3 * MIN_BLOCKS_PER_SPLIT, cpu) == 3  # no split shorter than the minimum
    wide = split_count(1, 1000, cpu)
    assert wide > 3 and split_count(64, 1000, cpu) < wide  # more sequences x heads, fewer splits
    assert split_count(4096, 1000, cpu) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][..., :24], "k_cache": a["k_cache"][..., :24],
                    "v_cache": a["v_cache"][..., :24]}, "head_dim"),
        (lambda a: {**a, "block_size": 48}, "block_size"),
        (lambda a: {**a, "k_cache": a["k_cache"][:, :, :-1]}, "k_cache and v_cache"),
        (lambda a: {**a, "k_cache": a["k_cache"][:, [0, 1, 1]], "v_cache": a["v_cache"][:, [0, 1, 1]]},
         "multiple of HKV"),
        (lambda a: {**a, "v_cache": a["v_cache"].double()}, "dtype"),
        (lambda a: {**a, "block_count": a["block_count"].to("meta")}, "device"),
        (lambda a: {**a, "q": a["q"][:, :, None, None]}, r"\[B, HQ, TQ, D\]"),
        (lambda a: {**a, "q": a["q"][:, :, None].expand(-1, -1, 40, -1)}, "query rows"),
        (lambda a: {**a, "block_idx": a["block_idx"][:, :1]}, "block_idx"),
        (lambda a: {**a, "block_count": a["block_count"][:1]}, "block_count"),
        (lambda a: {**a, "block_count": None}, "both None"),
        (lambda a: {**a, "block_idx": a["block_idx"].float()}, "integer"),
        (lambda a: {**a, "seq_lens": a["seq_lens"][:1]}, "seq_lens"),
        (lambda a: {**a, "seq_offsets": a["seq_lens"].float()}, "seq_offsets"),
    ],
    ids=["head_dim", "block_size", "kv_shape", "gqa", "dtype", "device", "q_dims", "rows", "block_idx",
         "block_count", "one_list_none", "idx_dtype", "seq_lens", "seq_offsets"],
)
def test_triton_rejects_bad_arguments(change, message):
    case = (2, 8, 2, 32, 16, [40, 17], 64, "random", None, False)
    q, k, v, idx, count, bs, lens, _, _ = make_case(case, dev=device())
    args = dict(q=q, k_cache=k, v_cache=v, block_idx=idx, block_count=count, block_size=bs, seq_lens=lens)
    with pytest.raises(ValueError, match=message):
        triton_sparse_decode_attention(**change(args))


# Llama-3.1-8B shape (HQ 32, HKV 8, D 128), bf16, 64-token blocks, caches of 16k-33k tokens
GPU_CASES = [
    (2, 32, 8, 128, 64, [32768, 20001], 33000, "random", None, False),
    (4, 32, 8, 128, 64, [16384, 9999, 1, 12345], 16500, "holes", None, True),
    (2, 32, 8, 128, 64, [30001, 777], 32768, "dense", None, True),
    (2, 32, 8, 128, 64, [16000, 4097], 16384, "all", 4, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_triton_bf16_gpu(case, nan_empty):
    q, k, v, idx, count, bs, lens, offsets, read = make_case(case, torch.bfloat16, "cuda")
    k, v = poison_unread(k, v, read)
    o = triton_sparse_decode_attention(q, k, v, idx, count, bs, lens, seq_offsets=offsets)
    ref = naive_sparse_decode_attention(q, k, v, idx, count, bs, lens, seq_offsets=offsets)
    assert o.dtype == torch.bfloat16 and rel_rms(o, ref) < 1e-2
