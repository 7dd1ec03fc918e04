"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (--cuda-graph-sizes; --enforce-eager).

A small model's decode step on a GPU is mostly Python and kernel launches; a CUDA graph replays the whole forward
pass as one launch. A graph fixes the addresses and shapes of its tensors, so a step's inputs are copied into static
buffers sized for the largest bucket, a step of n decodes replays the smallest bucket >= n, and the rows past n are
padding: token 0 at position 0, writing its K/V into a block of its own (the pad block, one past the blocks the block
pool hands out) and attending to that block alone. The block tables are as wide as max_model_len allows, so one graph
serves every sequence length (the kernels stop at each sequence's length).

Only steps of decodes alone, with dense attention on a plain KV cache, replay; any other step (a prefill chunk, an
attention policy, a quantized cache) and every step off CUDA runs eagerly. Tests on the CPU stand a plain call in for
each graph (`capture=False`), so the static buffers and the padding are checked without a GPU.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from afdserve.kernels.attention.metadata import AttentionMetadata
from afdserve.kernels.attention.torch_paged import decode_mask_bias

# The forward pass a graph captures: (input_ids [B], positions [B], meta) -> final hidden states [B, hidden].
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def graph_batch_sizes(sizes: tuple[int, ...], max_num_seqs: int) -> tuple[int, ...]:
    """The buckets worth capturing: those a step can fill (<= max_num_seqs), plus max_num_seqs itself where the
    buckets stop short of it, so that a full batch still replays."""
    kept = tuple(s for s in sizes if s <= max_num_seqs)
    if not kept or kept[-1] < max_num_seqs <= max(sizes):
        kept = (*kept, max_num_seqs)
    return kept


class DecodeGraphs:
    """The static input buffers and one replayable forward pass per bucket."""

    def __init__(self, forward: Forward, sizes: tuple[int, ...], max_blocks: int, block_size: int, pad_block: int,
                 device: torch.device, capture: bool = True):
        self.forward = forward
        self.sizes = tuple(sorted(sizes))
        self.block_size = block_size
        self.pad_block = pad_block
        rows = self.sizes[-1]
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(rows, **long)
        self.positions = torch.zeros(rows, **long)
        self.slot_mapping = torch.full((rows,), pad_block * block_size, **long)
        self.block_tables = torch.full((rows, max_blocks), pad_block, **long)
        self.seq_lens = torch.ones(rows, **long)
        self.mask_bias = decode_mask_bias(self.seq_lens, max_blocks * block_size)  # the torch backend's mask
        self.pad_mask_row = self.mask_bias[0].clone()
        self.pool = None  # the graphs share one memory pool: captured largest first, the smaller ones fit in it
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        for size in reversed(self.sizes):
            self.graphs[size] = self._capture(size) if capture else (lambda size=size: self._forward(size))

    def bucket(self, num_decodes: int) -> int | None:
        """The smallest captured batch size that holds num_decodes rows; None: more rows than any graph has."""
        i = bisect.bisect_left(self.sizes, num_decodes)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A decode-only step through the graph of its bucket: the final hidden states of its meta.num_decodes
        rows. The returned tensor is the graph's output buffer, valid until the next replay."""
        n = meta.num_decodes
        size = self.bucket(n)
        width = meta.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.decode_block_tables)  # columns past width: masked by seq_lens
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        self.mask_bias[:n, :, :width * self.block_size].copy_(meta.decode_mask_bias)
        self.mask_bias[:n, :, width * self.block_size:] = float("-inf")
        # Rows a larger step left behind become padding again.
        self.input_ids[n:size] = 0
        self.positions[n:size] = 0
        self.slot_mapping[n:size] = self.pad_block * self.block_size
        self.block_tables[n:size, 0] = self.pad_block
        self.seq_lens[n:size] = 1
        self.mask_bias[n:size] = self.pad_mask_row
        return self.graphs[size]()[:n]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_size=self.block_size, num_decodes=size,
                                 decode_block_tables=self.block_tables[:size], decode_mask_bias=self.mask_bias[:size],
                                 decode_seq_lens=self.seq_lens[:size])

    def _forward(self, size: int) -> torch.Tensor:
        return self.forward(self.input_ids[:size], self.positions[:size], self._meta(size))

    def _capture(self, size: int) -> Callable[[], torch.Tensor]:
        # A warm-up run first, outside the graph: it compiles the Triton kernels and lets the allocators settle
        # (it writes only the pad block, as every padding row does).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(size)
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
