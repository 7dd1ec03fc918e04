"""The staircase bookkeeping of the int4 / saq KV caches: which stair each block is on, and where its data lives.

A staircase is a list of stairs (age bound, bits), e.g. saq's default [(128, 16), (256, 8), (384, 4), (inf, 2)]:
a block whose newest token has `age` newer tokens after it sits on the first stair with age < bound. int4 is
[(R, 16), (inf, 4)]. The unfilled last block has age < 0, so it is always on stair 0 (full precision): KIVI keys
are quantized per channel over the whole block, which needs all its tokens.

Memory (all counted in KVCacheSpec, so the KV budget buys exactly what is allocated):
    floor stair      one slot per logical block, at the block id: what the block manager hands out
    stairs above     pools of slots sized for max_num_seqs sequences each holding the blocks of its age span
                     (stair 0 also for the blocks one step may write), at most half the KV budget in all;
                     a block there also keeps its floor home
Blocks only step down, except a block written again (reused, or a partial block that was evicted): it goes back
to stair 0 first. If a pool is short (more running sequences than it was sized for, or blocks left behind by
preempted requests), its longest-held block steps down one stair early: a loss of precision, never of data.

Per step the runner builds one KVStepPlan (host-side, before the forward); every layer's QuantizedKVCache replays
it: `before_write` moves, the token writes into stair-0 slots, then `after_write` moves. Moves replay in planning
order, where a slot is always freed before it is taken again; runs of one (source, destination) pair are batched.
"""
from __future__ import annotations

import math
from collections import OrderedDict
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
    before_write: list[Move]
    window_slot_mapping: torch.Tensor  # [T]: each new token's slot in the stair-0 pool
    after_write: list[Move]
    stair_of: torch.Tensor  # [num_blocks] long, after this step's moves
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

    The stair pools are sized for max_num_seqs sequences but take at most half of `budget_bytes`: past that many
    running sequences, the blocks held longest step down early (KVStairTable._take_slot)."""
    if fmt in ("auto", "fp8_e4m3", "int8"):
        return KVCacheSpec(fmt, shape, num_layers)
    stairs = tuple([(window, FULL_BITS), (math.inf, 4)] if fmt == "int4" else staircase)
    hd = shape.head_dim
    for _, bits in stairs[1:]:
        if hd % (8 // bits) or hd % min(VALUE_GROUP, hd):
            raise ValueError(f"kv_cache_dtype {fmt} needs head_dim divisible by {8 // bits} and by "
                             f"{min(VALUE_GROUP, hd)}, got {hd}")
    bs = shape.block_size
    # Stair 0: each sequence's window plus its partial block, and the blocks a step writes before they age out.
    step_blocks = math.ceil(max_num_batched_tokens / bs) + 2 * max_num_seqs  # pinned while the step writes them
    ages = [hi - lo for (lo, _), (hi, _) in zip(((0, 0),) + stairs[:-2], stairs[:-1])]
    aged = [max_num_seqs * (math.ceil(age / bs) + 1) for age in ages]  # each sequence's blocks on each stair
    spec = KVCacheSpec(fmt, shape, num_layers, stairs, tuple(aged))
    pinned = step_blocks * spec.stair_block_bytes(0)
    shrink = min(1.0, max(0.0, budget_bytes / 2 - pinned) / spec.pool_bytes)
    slots = [int(n * shrink) for n in aged]
    slots[0] += step_blocks
    return KVCacheSpec(fmt, shape, num_layers, stairs, tuple(max(1, n) for n in slots))


# ---- the per-step plan ----------------------------------------------------------------------------------------
class KVStairTable:
    """Per block: its stair, its slot there, and how many of its tokens are written. Shared by all layers."""

    def __init__(self, stairs: tuple[Stair, ...], stair_slots: tuple[int, ...], num_blocks: int, block_size: int):
        self.bounds = [bound for bound, _ in stairs]
        self.floor = len(stairs) - 1
        self.block_size = block_size
        self.stair = [self.floor] * num_blocks
        self.slot = list(range(num_blocks))  # on the floor a block's slot is its id
        self.filled = [0] * num_blocks
        self.free = [list(range(n - 1, -1, -1)) for n in stair_slots]  # per upper stair, popped from the end
        self.holders = [OrderedDict() for _ in stair_slots]  # per upper stair: its blocks, oldest arrival first
        self.stair_t = torch.full((num_blocks,), self.floor, dtype=torch.long)
        self.slot_t = torch.arange(num_blocks)

    def stair_for_age(self, age: int) -> int:
        return next(i for i, bound in enumerate(self.bounds) if age < bound)

    def plan(self, seqs: list[tuple[list[int], int, int]]) -> KVStepPlan:
        """seqs: (block table, first new position, new tokens) per sequence, in the flat batch's token order."""
        self._moves: list[tuple[int, int, int, int, int]] = []  # (src, dst, src slot, dst slot, rows)
        self._changed: set[int] = set()
        self._arrived: set[int] = set()  # blocks that entered a pool this step: not to be evicted from it
        self._open_window(seqs)
        before = self._take_moves()
        bs = self.block_size
        window_slots = [self.slot[table[p // bs]] * bs + p % bs
                        for table, start, n in seqs for p in range(start, start + n)]
        self._step_down(seqs)
        after = self._take_moves()
        if self._changed:
            idx = torch.tensor(sorted(self._changed))
            self.stair_t[idx] = torch.tensor([self.stair[b] for b in idx.tolist()])
            self.slot_t[idx] = torch.tensor([self.slot[b] for b in idx.tolist()])
        return KVStepPlan(before, torch.tensor(window_slots, dtype=torch.long), after, self.stair_t.clone(),
                          self.slot_t.clone())

    def _open_window(self, seqs: list[tuple[list[int], int, int]]) -> None:
        """Every block written this step goes to stair 0, with its earlier tokens if it has any."""
        bs = self.block_size
        for table, start, n in seqs:
            for i in range(start // bs, (start + n - 1) // bs + 1):
                block = table[i]
                if start <= i * bs:
                    self.filled[block] = 0  # written from its first row: a fresh block, old contents are stale
                if self.stair[block] != 0:
                    self._relocate(block, 0, keep_data=self.filled[block] > 0)
                self._arrived.add(block)
                self.filled[block] = max(self.filled[block], min(bs, start + n - i * bs))

    def _step_down(self, seqs: list[tuple[list[int], int, int]]) -> None:
        """Blocks whose age crossed a stair bound move down, deepest source stair first (frees before takes)."""
        bs = self.block_size
        targets: dict[int, int] = {}
        for table, start, n in seqs:
            seq_len = start + n
            for i in range(-(-seq_len // bs) - 1, -1, -1):
                block = table[i]
                target = self.stair_for_age(seq_len - (i + 1) * bs)
                if target == self.floor and self.stair[block] == self.floor:
                    break  # older blocks have reached the floor too
                if target > self.stair[block]:
                    targets[block] = max(target, targets.get(block, 0))
        for block in sorted(targets, key=lambda b: -self.stair[b]):
            self._relocate(block, targets[block], keep_data=True)

    def _relocate(self, block: int, dst: int, keep_data: bool) -> None:
        src, src_slot = self.stair[block], self.slot[block]
        if src != self.floor:
            del self.holders[src][block]
            self.free[src].append(src_slot)
        dst_slot = block if dst == self.floor else self._take_slot(dst)
        if dst != self.floor:
            self.holders[dst][block] = None
            self._arrived.add(block)
        if keep_data:
            self._moves.append((src, dst, src_slot, dst_slot, self.filled[block]))
        self.stair[block], self.slot[block] = dst, dst_slot
        self._changed.add(block)

    def _take_slot(self, stair: int) -> int:
        if not self.free[stair]:  # the block held longest (often one a preempted request left) steps down early
            victim = next((b for b in self.holders[stair] if b not in self._arrived), None)
            if victim is None:
                raise RuntimeError(f"KV stair {stair} has no slot left for this step's blocks")
            self._relocate(victim, stair + 1, keep_data=True)
        return self.free[stair].pop()

    def _take_moves(self) -> list[Move]:
        """This phase's moves in planning order (a slot is always vacated before it is taken again), with each
        run of the same (source, destination) stairs batched into one Move."""
        batches: list[Move] = []
        for src, dst, src_slot, dst_slot, rows in self._moves:
            if not batches or (batches[-1].src, batches[-1].dst) != (src, dst):
                batches.append(Move(src, dst, [], [], []))
            batches[-1].src_slots.append(src_slot)
            batches[-1].dst_slots.append(dst_slot)
            batches[-1].rows.append(rows)
        self._moves = []
        for m in batches:
            m.src_slots, m.dst_slots, m.rows = (torch.tensor(x, dtype=torch.long)
                                                for x in (m.src_slots, m.dst_slots, m.rows))
        return batches
