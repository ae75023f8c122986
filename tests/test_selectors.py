"""Block selection from scores: threshold, density, coverage, forced blocks, packing into lists."""

import itertools
import math

import pytest
import torch

from seerattn_hf import SeerAttentionConfig
from seerattn_hf.selectors import (
    block_density_counts,
    kept_block_counts,
    mask_to_block_lists,
    select_block_lists,
    select_blocks,
    streaming_scores,
)


def _random_probs(batch, heads, blocks):
    scores = torch.randn(batch, heads, blocks, blocks) * 3
    causal = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def _causal(blocks):
    return torch.ones(blocks, blocks, dtype=torch.bool).tril()


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_density_keeps_the_top_blocks_of_each_row(density):
    probs = _random_probs(2, 3, 11)
    mask = select_blocks(SeerAttentionConfig(sparsity_method="density", density=density), probs)
    assert not (mask & ~_causal(11)).any()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    for b, h, i in [(0, 0, 10), (1, 2, 6), (0, 1, 3)]:
        budget = math.ceil(density * (i + 1))
        kept = mask[b, h, i].nonzero().flatten().tolist()
        assert len(kept) == budget
        others = [j for j in range(i) if j not in kept]
        non_diagonal = [j for j in kept if j != i]
        if others and non_diagonal:
            assert min(probs[b, h, i, non_diagonal]) >= max(probs[b, h, i, others])


def test_threshold_keeps_blocks_above_it_plus_the_diagonal():
    probs = _random_probs(1, 2, 9)
    mask = select_blocks(SeerAttentionConfig(sparsity_method="threshold", threshold=0.05), probs)
    expected = (probs > 0.05) | torch.eye(9, dtype=torch.bool)
    assert torch.equal(mask, expected & _causal(9))


def test_coverage_keeps_the_fewest_blocks_reaching_the_mass():
    probs = _random_probs(2, 2, 12)
    coverage = 0.8
    mask = select_blocks(SeerAttentionConfig(sparsity_method="coverage", coverage=coverage), probs)
    for b, h, i in [(0, 0, 11), (1, 1, 7), (0, 1, 4)]:
        row = probs[b, h, i, : i + 1]
        ranked = row.sort(descending=True).values
        needed = int((ranked.cumsum(0) < coverage - 1e-7).sum()) + 1
        kept = mask[b, h, i, : i + 1]
        assert (row[kept].sum() >= coverage - 1e-6)
        assert kept.sum() <= max(needed, 1) + 1  # the diagonal may come on top


def test_forced_blocks_and_dense_last_row():
    probs = _random_probs(1, 1, 10)
    config = SeerAttentionConfig(sparsity_method="threshold", threshold=0.99, keep_first_blocks=1,
                                 keep_recent_blocks=2, dense_last_query_blocks=1)
    mask = select_blocks(config, probs)[0, 0]
    assert mask[:, 0].all() and mask.diagonal().all()
    assert mask[5, 3] and mask[5, 4] and mask[1, 0]
    assert mask[9].all()
    assert not mask[6, 1]


def test_padding_rows_keep_only_the_diagonal_and_dense_last_row_follows_padding():
    probs = _random_probs(2, 1, 6)
    row_valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    config = SeerAttentionConfig(sparsity_method="density", density=0.2, dense_last_query_blocks=1)
    mask = select_blocks(config, probs, row_valid)
    assert torch.equal(mask[1, 0, 3:], torch.eye(6, dtype=torch.bool)[3:])
    assert mask[1, 0, 2, :3].all() and mask[0, 0, 5].all()
    kept, total = block_density_counts(mask, row_valid)
    assert int(total[0]) == 21 + 6
    assert int(kept[0]) == int(mask[0, 0].sum()) + int(mask[1, 0, :3].sum())


@pytest.mark.parametrize("nz_ratio", [0.05, 0.3, 0.5, 0.9, 1.0])
def test_nz_ratio_keeps_the_same_number_of_best_blocks_in_every_row(nz_ratio):
    blocks = 13
    probs = _random_probs(2, 3, blocks)
    mask = select_blocks(SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=nz_ratio, keep_diagonal=False), probs)
    k = max(1, int((1 - math.sqrt(1 - nz_ratio)) * blocks))
    assert not (mask & ~_causal(blocks)).any()
    for b, h, i in itertools.product(range(2), range(3), range(blocks)):
        kept = mask[b, h, i].nonzero().flatten().tolist()
        assert len(kept) == min(k, i + 1)
        dropped = [j for j in range(i + 1) if j not in kept]
        if dropped:
            assert min(probs[b, h, i, kept]) >= max(probs[b, h, i, dropped])


def test_without_the_diagonal_only_an_empty_row_gets_its_best_block():
    probs = torch.tensor([[0.5, 0.0, 0.0], [0.7, 0.3, 0.0], [0.34, 0.33, 0.33]])[None, None]
    mask = select_blocks(SeerAttentionConfig(threshold=0.4, keep_diagonal=False), probs)[0, 0]
    # Row 2 has nothing above 0.4: it keeps its best block (0), not its diagonal.
    assert mask.tolist() == [[True, False, False], [True, False, False], [True, False, False]]
    assert select_blocks(SeerAttentionConfig(threshold=0.4), probs)[0, 0].diagonal().all()


def test_dense_last_rows_count_from_each_sequences_end():
    probs = _random_probs(2, 1, 8)
    row_valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    config = SeerAttentionConfig(threshold=0.99, keep_diagonal=False, dense_last_query_blocks=2)
    mask = select_blocks(config, probs, row_valid)[:, 0]
    assert mask[0, 6:].equal(_causal(8)[6:]) and mask[1, 3:5].equal(_causal(8)[3:5])
    assert mask[0, 5].sum() == 1 and mask[1, 2].sum() == 1


def test_nz_ratio_counts_blocks_per_sequence_under_left_padding():
    # A left-padded sequence of 6 real blocks in a batch of 12: k comes from its own 6 blocks.
    probs = _random_probs(2, 2, 12)
    row_valid = torch.tensor([[True] * 12, [True] * 6 + [False] * 6])
    config = SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.5, keep_diagonal=False)
    padded = select_blocks(config, probs, row_valid)
    alone = select_blocks(config, probs[1:, :, :6, :6])
    assert torch.equal(padded[1, :, :6, :6], alone[0])
    assert int(padded[1, 0, 5].sum()) == int((1 - math.sqrt(0.5)) * 6)
    assert int(padded[0, 0, 11].sum()) == int((1 - math.sqrt(0.5)) * 12)


def test_streaming_keeps_the_first_and_most_recent_blocks():
    scores = streaming_scores(1, 1, 8, torch.device("cpu"))
    mask = select_blocks(SeerAttentionConfig(sparsity_method="density", density=0.5), scores)[0, 0]
    assert mask[7].nonzero().flatten().tolist() == [0, 5, 6, 7]
    assert mask[2].nonzero().flatten().tolist() == [0, 2]


def test_mask_to_block_lists_round_trip():
    mask = select_blocks(SeerAttentionConfig(sparsity_method="density", density=0.4), _random_probs(2, 3, 13))
    mask[0, 0, 5] = False  # a row that keeps nothing
    block_idx, block_count = mask_to_block_lists(mask)
    assert block_idx.dtype == block_count.dtype == torch.int32
    assert block_idx.shape[-1] == int(mask.sum(-1).max())
    rebuilt = torch.zeros_like(mask)
    for b in range(2):
        for h in range(3):
            for i in range(13):
                row = block_idx[b, h, i, : block_count[b, h, i]].long()
                assert torch.equal(row, row.sort().values)
                rebuilt[b, h, i, row] = True
    assert torch.equal(rebuilt, mask)
    assert int(block_idx.max()) < 13 and int(block_idx.min()) >= 0


@pytest.mark.parametrize("config", [
    SeerAttentionConfig(sparsity_method="density", density=0.3),
    SeerAttentionConfig(sparsity_method="density", density=0.1, keep_first_blocks=1, keep_recent_blocks=2),
    SeerAttentionConfig(sparsity_method="density", density=1.0),
    SeerAttentionConfig(sparsity_method="density", density=0.5, dense_last_query_blocks=1),
    SeerAttentionConfig(sparsity_method="threshold", threshold=0.05),
    SeerAttentionConfig(sparsity_method="coverage", coverage=0.7),
    SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.3, keep_diagonal=False),
    SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.5, keep_first_blocks=1),
    SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.2, keep_diagonal=False, dense_last_query_blocks=2),
    SeerAttentionConfig(sparsity_method="threshold", threshold=0.1, keep_diagonal=False),
], ids=lambda c: f"{c.sparsity_method}-{c.density}-{c.keep_recent_blocks}-{c.dense_last_query_blocks}")
def test_select_block_lists_equals_the_packed_mask(config):
    probs = _random_probs(3, 2, 17)
    row_valid = torch.ones(3, 17, dtype=torch.bool)
    row_valid[1, 9:] = False
    for valid in (None, row_valid):
        mask = select_blocks(config, probs, valid)
        expected_idx, expected_count = mask_to_block_lists(mask)
        block_idx, block_count = select_block_lists(config, probs, valid)
        assert torch.equal(block_count, expected_count)
        for b, h, i in itertools.product(range(3), range(2), range(17)):
            n = int(expected_count[b, h, i])
            assert torch.equal(block_idx[b, h, i, :n], expected_idx[b, h, i, :n])
        assert torch.equal(kept_block_counts(block_count, valid)[0], block_density_counts(mask, valid)[0])
        assert torch.equal(kept_block_counts(block_count, valid)[1], block_density_counts(mask, valid)[1])


@pytest.mark.parametrize("config", [
    SeerAttentionConfig(sparsity_method="density", density=0.3, keep_first_blocks=1, keep_recent_blocks=2),
    SeerAttentionConfig(sparsity_method="density", density=0.5, dense_last_query_blocks=1),
    SeerAttentionConfig(sparsity_method="threshold", threshold=0.05),
    SeerAttentionConfig(sparsity_method="threshold", threshold=0.1, keep_diagonal=False),
    SeerAttentionConfig(sparsity_method="coverage", coverage=0.7),
    SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.3, keep_diagonal=False),
    SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.2, dense_last_query_blocks=2),
], ids=lambda c: f"{c.sparsity_method}-{c.keep_diagonal}-{c.dense_last_query_blocks}")
def test_a_query_chunk_selects_the_rows_of_the_whole_prompt(config):
    """The last rows of a prompt, selected as a chunk continued from a cache (each sequence's rows on
    their own diagonals, sequence 1 shorter: left padding), keep what the whole prompt keeps there."""
    probs = _random_probs(3, 2, 17)
    row_valid = torch.ones(3, 17, dtype=torch.bool)
    row_valid[1, 9:] = False
    diagonal = torch.tensor([[14, 15, 16], [6, 7, 8], [14, 15, 16]])
    rows = diagonal[:, None, :, None]
    chunk_probs = probs.gather(2, rows.expand(-1, 2, -1, 17))
    whole_idx, whole_count = select_block_lists(config, probs, row_valid)
    idx, count = select_block_lists(config, chunk_probs, torch.ones(3, 3, dtype=torch.bool), diagonal)
    assert torch.equal(count, whole_count.gather(2, diagonal[:, None].expand(-1, 2, -1)))
    expected = whole_idx.gather(2, rows.expand(-1, 2, -1, whole_idx.shape[-1]))
    for b, h, i in itertools.product(range(3), range(2), range(3)):
        n = int(count[b, h, i])
        assert torch.equal(idx[b, h, i, :n], expected[b, h, i, :n])
    kept, causal = kept_block_counts(count, None, diagonal)
    assert int(causal[0]) == int((diagonal + 1).sum()) and torch.equal(kept, count.sum(dim=(0, 2)))


@pytest.mark.parametrize("config", [
    SeerAttentionConfig(sparsity_method="density", density=0.3, keep_first_blocks=1, keep_recent_blocks=2),
    SeerAttentionConfig(sparsity_method="density", density=1.0),
    SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.3, keep_diagonal=False),
], ids=lambda c: f"{c.sparsity_method}-{c.density}-{c.nz_ratio}-{c.keep_first_blocks}-{c.keep_diagonal}")
@pytest.mark.parametrize("layout", ["prompt", "padding", "chunk"])
def test_the_fused_ranking_selection_equals_the_torch_one(config, layout):
    blocks = 19  # not a power of two
    probs = _random_probs(2, 2, blocks).log()
    row_valid, diagonal = None, None
    if layout == "padding":
        row_valid = torch.ones(2, blocks, dtype=torch.bool)
        row_valid[1, 11:] = False
    elif layout == "chunk":
        diagonal = torch.tensor([[15, 16, 17, 18], [6, 7, 8, 9]])
        probs = probs.gather(2, diagonal[:, None, :, None].expand(-1, 2, -1, blocks))
        row_valid = torch.tensor([[True] * 4, [True, True, True, False]])
    expected_idx, expected_count = select_block_lists(config, probs, row_valid, diagonal)
    idx, count = select_block_lists(config, probs, row_valid, diagonal, fused=True)
    assert torch.equal(count, expected_count)
    for b, h, i in itertools.product(*(range(n) for n in count.shape)):
        n = int(count[b, h, i])
        assert torch.equal(idx[b, h, i, :n], expected_idx[b, h, i, :n])
        assert (idx[b, h, i, n:] == idx[b, h, i, n - 1]).all()


@pytest.mark.gpu
def test_the_fused_ranking_selection_equals_the_torch_one_at_128k_gpu():
    scores = torch.randn(1, 8, 2048, 2048, device="cuda").masked_fill(~_causal(2048).cuda(), float("-inf"))
    config = SeerAttentionConfig(sparsity_method="density", density=0.1, keep_first_blocks=1)
    expected_idx, expected_count = select_block_lists(config, scores)
    idx, count = select_block_lists(config, scores, fused=True)
    width = expected_idx.shape[-1]
    kept = torch.arange(width, device="cuda") < expected_count[..., None]
    assert torch.equal(count, expected_count)
    assert torch.equal(torch.where(kept, idx[..., :width], 0), torch.where(kept, expected_idx, 0))
