"""Block geometry: how a sequence splits into blocks, block pooling and which blocks are real."""

from __future__ import annotations

import torch


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def causal_block_mask(blocks: int, device: torch.device) -> torch.Tensor:
    return torch.ones(blocks, blocks, dtype=torch.bool, device=device).tril()


def pool_blocks(x: torch.Tensor, kinds: list[str], block_size: int) -> torch.Tensor:
    """Pool `x: [B, T, H, D]` along T in blocks (the last may be partial) -> `[B, NB, H, D * len(kinds)]`.

    Full blocks are pooled through a view and the partial tail separately, so nothing of the size
    of `x` is copied; averages accumulate in float32.
    """
    batch, length, heads, dim = x.shape
    full = length // block_size
    pieces = []
    if full:
        pieces.append(x[:, : full * block_size].view(batch, full, block_size, heads, dim))
    if length > full * block_size:
        pieces.append(x[:, full * block_size:].unsqueeze(1))
    pooled = []
    for kind in kinds:
        per_piece = []
        for piece in pieces:
            if kind == "avg":
                per_piece.append(piece.mean(dim=2, dtype=torch.float32))
            elif kind == "max":
                per_piece.append(piece.amax(dim=2).float())
            else:
                per_piece.append(piece.amin(dim=2).float())
        pooled.append(torch.cat(per_piece, dim=1) if len(per_piece) > 1 else per_piece[0])
    return torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]


def pool_blocks_padded(x: torch.Tensor, kinds: list[str], block_size: int,
                       seq_offsets: torch.Tensor | None) -> torch.Tensor:
    """`pool_blocks` for a left-padded batch: sequence b starts at `seq_offsets[b]` and its blocks
    are counted from there. Blocks past a sequence's end are zero."""
    if seq_offsets is None:
        return pool_blocks(x, kinds, block_size)
    length = x.shape[1]
    total_blocks = num_blocks(length, block_size)
    pooled = x.new_zeros(x.shape[0], total_blocks, x.shape[2], x.shape[3] * len(kinds),
                         dtype=torch.float32)
    for b, offset in enumerate(seq_offsets.tolist()):
        if offset < length:
            own = pool_blocks(x[b: b + 1, offset:], kinds, block_size)
            pooled[b, : own.shape[1]] = own[0]
    return pooled


def pool_query_blocks(x: torch.Tensor, kinds: list[str], block_size: int, key_length: int,
                      seq_offsets: torch.Tensor | None) -> torch.Tensor:
    """`pool_blocks_padded` for a query chunk, the last `x.shape[1]` of `key_length` positions ->
    `[B, R, H, D * len(kinds)]`, R = `query_block_rows(...)`, rows as `query_block_diagonals` orders
    them. A chunk starting inside a block pools that block's queries in the chunk only (the cached
    ones are not computed again). Rows past a sequence's end are zero."""
    query_length = x.shape[1]
    if query_length == key_length:
        return pool_blocks_padded(x, kinds, block_size, seq_offsets)
    query_start = key_length - query_length
    if seq_offsets is None:
        return _pool_from(x, kinds, block_size, query_start)
    rows = query_block_rows(query_length, key_length, block_size, seq_offsets)
    pooled = x.new_zeros(x.shape[0], rows, x.shape[2], x.shape[3] * len(kinds), dtype=torch.float32)
    for b, offset in enumerate(seq_offsets.tolist()):
        if offset < key_length:
            own = _pool_from(x[b: b + 1, max(offset - query_start, 0):], kinds, block_size,
                             max(query_start - offset, 0))
            pooled[b, : own.shape[1]] = own[0]
    return pooled


def _pool_from(x: torch.Tensor, kinds: list[str], block_size: int, position: int) -> torch.Tensor:
    """`pool_blocks` of `x: [B, T, H, D]` whose first token sits at sequence position `position`
    (the first block is then partial)."""
    head = min(-position % block_size, x.shape[1])
    pieces = [pool_blocks(piece, kinds, block_size) for piece in (x[:, :head], x[:, head:]) if piece.shape[1]]
    return torch.cat(pieces, dim=1)


def valid_block_rows(length: int, block_size: int, seq_offsets: torch.Tensor | None,
                     batch: int, device: torch.device) -> torch.Tensor:
    """`[B, NB]` bool: which query blocks hold at least one real token of their sequence."""
    total_blocks = num_blocks(length, block_size)
    if seq_offsets is None:
        return torch.ones(batch, total_blocks, dtype=torch.bool, device=device)
    own_blocks = (length - seq_offsets.to(device) + block_size - 1) // block_size
    return torch.arange(total_blocks, device=device)[None, :] < own_blocks[:, None]


def query_block_rows(query_length: int, key_length: int, block_size: int,
                     seq_offsets: torch.Tensor | None) -> int:
    """How many query-block rows the kept-block lists of a query chunk hold.

    The chunk is the last `query_length` of `key_length` positions (a prompt continued from a cache;
    the whole sequence when they are equal). Blocks are counted from each sequence's first real token
    (`seq_offsets`), so a chunk may start inside a block: its first row is then that block, partly
    cached. Equal lengths give `num_blocks(key_length)` whatever the padding (the one-shot layout).
    """
    query_start = key_length - query_length
    if seq_offsets is None:
        return num_blocks(key_length, block_size) - query_start // block_size
    first = [max(query_start - offset, 0) // block_size for offset in seq_offsets.tolist()]
    return num_blocks(key_length, block_size) - min(first)


def query_block_diagonals(query_length: int, key_length: int, block_size: int, seq_offsets: torch.Tensor | None,
                          batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(`diagonal`, `row_valid`), both `[B, R]` with R = `query_block_rows(...)`: the key block on the
    diagonal of each query-block row of the chunk (its block index in the sequence; rows past the
    sequence's end hold the last key block), and whether the row holds a real query token of the
    chunk."""
    rows = query_block_rows(query_length, key_length, block_size, seq_offsets)
    query_start = key_length - query_length
    if seq_offsets is None:  # one layout for the batch, built without reading anything back
        diagonal = torch.arange(query_start // block_size, query_start // block_size + rows, device=device)
        return diagonal.expand(batch, rows), torch.ones(batch, rows, dtype=torch.bool, device=device)
    offsets = seq_offsets.to(device).long()
    first = (query_start - offsets).clamp(min=0) // block_size
    sequence_blocks = (key_length - offsets + block_size - 1) // block_size
    diagonal = first[:, None] + torch.arange(rows, device=device)[None, :]
    row_valid = diagonal < sequence_blocks[:, None]
    # Rows past a sequence's end (left padding shifts its blocks) stay inside the key blocks.
    return diagonal.clamp(max=num_blocks(key_length, block_size) - 1), row_valid
