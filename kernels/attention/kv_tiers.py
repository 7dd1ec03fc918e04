"""The int4 / saq KV caches' staircase on the runner side: what its stair pools cost, and the per-step view.

A staircase is a list of stairs (age bound, bits), e.g. saq's default [(128, 16), (256, 8), (384, 4), (inf, 2)];
int4 is [(R, 16), (inf, 4)]. Which stair each block is on is decided beside the block pool
(engine/kv_staircase.KVStaircase), where admission sees the pools' capacity; its moves reach the runner as plain
data, and KVStairView turns them into one KVStepPlan per step, which every layer's QuantizedKVCache replays
before the step's first write.

Memory (all counted in KVCacheSpec, so the KV budget buys exactly what is allocated):
    floor stair      one slot per logical block, at the block id: what the block manager hands out
    stairs above     pools of slots sized for max_num_seqs sequences each holding the blocks of its age span
                     (stair 0 also for the blocks one step may write), at most half the KV budget in all;
                     a block there also keeps its floor home
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afdserve.kernels.attention.kv_quant import (FULL_BITS, FullPrecisionStore, KiviStore, KVShape, TokenScaledStore,
                                                 VALUE_GROUP)

Stair = tuple[float, int]  # (age bound in tokens, bits)


@dataclass
class Move:
    src: int  # stair
    dst: int
    src_slots: torch.Tensor  # [n] long
    dst_slots: torch.Tensor
    rows: torch.Tensor  # [n] long: tokens written in each block


@dataclass
class KVStepPlan:
    """One step's moves, replayed by each layer before its first write; the step's tokens then go to stair 0 at
    slot_of[block] (the runner's slot_mapping)."""
    moves: list[Move]
    stair_of: torch.Tensor  # [num_blocks] long, after this step's moves (the view's own, valid for this step)
    slot_of: torch.Tensor  # [num_blocks] long


# ---- sizing ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCacheSpec:
    """What one KV format costs: bytes per block at the floor, plus the fixed bytes of the stair pools."""
    fmt: str  # a KV_CACHE_DTYPES name
    shape: KVShape
    num_layers: int
    stairs: tuple[Stair, ...] = ()  # int4 / saq only
    stair_slots: tuple[int, ...] = ()  # pool slots of each stair above the floor
    max_seqs: int = 0  # int4 / saq: sequences whose every stair span fits the pools at once

    @property
    def block_bytes(self) -> int:
        """Bytes of one block at the floor format, over all layers."""
        if self.fmt == "auto":
            per_layer = FullPrecisionStore.bytes_per_block(self.shape)
        elif self.fmt in ("fp8_e4m3", "int8"):
            per_layer = TokenScaledStore.bytes_per_block(self.shape)
        else:
            per_layer = KiviStore.bytes_per_block(self.shape, self.stairs[-1][1])
        return per_layer * self.num_layers

    def stair_block_bytes(self, stair: int) -> int:
        """Bytes of one slot of a stair's pool, over all layers."""
        bits = self.stairs[stair][1]
        per = (FullPrecisionStore.bytes_per_block(self.shape) if bits == FULL_BITS
               else KiviStore.bytes_per_block(self.shape, bits))
        return per * self.num_layers

    @property
    def pool_bytes(self) -> int:
        """Bytes of the stair pools above the floor, over all layers."""
        return sum(self.stair_block_bytes(i) * n for i, n in enumerate(self.stair_slots))

    def num_blocks(self, budget_bytes: float) -> int:
        room = budget_bytes - self.pool_bytes
        if room < self.block_bytes:
            raise ValueError(
                f"kv_cache_dtype {self.fmt}: its full-precision window and stair pools take "
                f"{self.pool_bytes / 2**30:.3f} GiB of the {budget_bytes / 2**30:.3f} GiB KV budget, leaving no room "
                f"for blocks; lower max_num_seqs, max_num_batched_tokens or the window/staircase, or raise "
                f"kv_cache_memory_gb")
        return int(room // self.block_bytes)


def kv_cache_spec(fmt: str, shape: KVShape, num_layers: int, window: int, staircase: list[Stair],
                  max_num_seqs: int, max_num_batched_tokens: int, budget_bytes: float) -> KVCacheSpec:
    """The spec of `fmt`; int4 uses [(window, 16), (inf, 4)], saq uses `staircase`.

    The stair pools are sized for max_num_seqs sequences but take at most half of `budget_bytes`; `max_seqs` says
    how many sequences they then hold, and the scheduler runs no more than that at once."""
    if fmt in ("auto", "fp8_e4m3", "int8"):
        return KVCacheSpec(fmt, shape, num_layers)
    stairs = tuple([(window, FULL_BITS), (math.inf, 4)] if fmt == "int4" else staircase)
    hd = shape.head_dim
    for _, bits in stairs[1:]:
        if hd % (8 // bits) or hd % min(VALUE_GROUP, hd):
            raise ValueError(f"kv_cache_dtype {fmt} needs head_dim divisible by {8 // bits} and by "
                             f"{min(VALUE_GROUP, hd)}, got {hd}")
    bs = shape.block_size
    # Stair 0: each sequence's window plus its partial block, and the blocks a step writes before they age out:
    # its tokens' blocks plus, per prefilling sequence, one its chunk's start shares with the block before (at most
    # one per block of tokens, beyond which the step's own blocks step down early). A decode writes its partial
    # block, already in its window. Sized per running sequence (2 per sequence, as before), this pinned 640
    # full-precision blocks at the defaults: most of the pools' half of a 1 GB budget in fp32, leaving windows
    # for 9 sequences.
    step_blocks = 2 * math.ceil(max_num_batched_tokens / bs)  # pinned while the step writes them
    ages = [hi - lo for (lo, _), (hi, _) in zip(((0, 0),) + stairs[:-2], stairs[:-1])]
    per_seq = [math.ceil(age / bs) + 1 for age in ages]  # a sequence's blocks on each stair
    aged = [max_num_seqs * n for n in per_seq]
    spec = KVCacheSpec(fmt, shape, num_layers, stairs, tuple(aged))
    pinned = step_blocks * spec.stair_block_bytes(0)
    shrink = min(1.0, max(0.0, budget_bytes / 2 - pinned) / spec.pool_bytes)
    slots = [max(1, int(n * shrink)) for n in aged]
    max_seqs = max(1, min(n // need for n, need in zip(slots, per_seq)))
    slots[0] += step_blocks
    return KVCacheSpec(fmt, shape, num_layers, stairs, tuple(slots), max_seqs)


# ---- the per-step view ----------------------------------------------------------------------------------------
class KVStairView:
    """The runner's copy of each block's (stair, slot), kept in step with the scheduler's KVStaircase by
    replaying its moves: the moves need the source of each block, which the scheduler does not send."""

    def __init__(self, num_blocks: int, floor: int):
        self.floor = floor
        self.stair = [floor] * num_blocks
        self.slot = list(range(num_blocks))
        self.stair_of = torch.full((num_blocks,), floor, dtype=torch.long)
        self.slot_of = torch.arange(num_blocks)

    def replay(self, stair_moves: list) -> KVStepPlan:
        """stair_moves: engine/kv_staircase.StairMove's (block, stair, slot, rows), in planning order (a slot is
        always vacated before it is taken again). Runs of one (source, destination) pair batch into one Move."""
        batches: list[Move] = []
        for block, dst, dst_slot, rows in stair_moves:
            src, src_slot = self.stair[block], self.slot[block]
            self.stair[block], self.slot[block] = dst, dst_slot
            if not rows:
                continue  # nothing worth keeping: the block is written from its first row this step
            if not batches or (batches[-1].src, batches[-1].dst) != (src, dst):
                batches.append(Move(src, dst, [], [], []))
            batches[-1].src_slots.append(src_slot)
            batches[-1].dst_slots.append(dst_slot)
            batches[-1].rows.append(rows)
        for m in batches:
            m.src_slots, m.dst_slots, m.rows = (torch.tensor(x, dtype=torch.long)
                                                for x in (m.src_slots, m.dst_slots, m.rows))
        if stair_moves:
            idx = torch.tensor(sorted({m[0] for m in stair_moves}))
            self.stair_of[idx] = torch.tensor([self.stair[b] for b in idx.tolist()])
            self.slot_of[idx] = torch.tensor([self.slot[b] for b in idx.tolist()])
        # No copies: a step's gathers all run before the next step's replay updates these in place.
        return KVStepPlan(batches, self.stair_of, self.slot_of)
