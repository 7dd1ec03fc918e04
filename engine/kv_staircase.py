"""The int4 / saq staircase's slots, kept beside the block pool: which stair each block is on and where its data is.

A staircase is a list of stairs (age bound, bits), e.g. saq's default [(128, 16), (256, 8), (384, 4), (inf, 2)]:
a block whose newest token has `age` newer tokens after it belongs on the first stair with age < bound. int4 is
[(R, 16), (inf, 4)]. The floor (the last stair) has one slot per block, at the block's id; every stair above has a
pool of slots (kernels/attention/kv_tiers.kv_cache_spec sizes them). A block on an upper stair keeps its floor home.

The scheduler drives it through KVCacheManager.allocate_slots, once per scheduled request per step:
    1. blocks that have aged past their stair (by the tokens already in the KV) step down;
    2. every block the step writes goes to stair 0 (full precision), with its earlier rows if it has any:
       KIVI keys are quantized per channel over a whole block, which needs all its tokens.
Step-downs wait for the request's next step, so one move list per step, replayed before any write, serves every
micro-batch. The moves travel as plain data (SchedulerOutput.kv_moves); the runner replays them on every layer's
QuantizedKVCache (kernels/attention/kv_tiers.KVStairView). Because admission sees the pools, the scheduler runs
at most `max_seqs` sequences at once; a block steps down early only when a pool is short of slots, taking first
the blocks no request holds (a finished or preempted request's): a loss of precision, never of data.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple

Stair = tuple[float, int]  # (age bound in tokens, bits)


class StairMove(NamedTuple):
    """Block `block` goes to `stair`, slot `slot` there (its id on the floor); `rows` of its data come along
    (0: nothing worth keeping, e.g. a block about to be written from its first row)."""
    block: int
    stair: int
    slot: int
    rows: int


class KVStaircase:
    def __init__(self, stairs: tuple[Stair, ...], stair_slots: tuple[int, ...], num_blocks: int, block_size: int,
                 max_seqs: int, in_use: Callable[[int], bool]):
        self.bounds = [bound for bound, _ in stairs]
        self.stair_slots = stair_slots
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = max_seqs  # sequences whose every stair span fits the pools at once
        self.in_use = in_use  # block id -> held by a request (the block pool's ref count)
        self.reset()

    @property
    def floor(self) -> int:
        return len(self.bounds) - 1

    def reset(self) -> None:
        """Every block on the floor, every pool empty: the state of a freshly allocated cache."""
        self.stair = [self.floor] * self.num_blocks
        self.slot = list(range(self.num_blocks))  # on the floor a block's slot is its id
        self.filled = [0] * self.num_blocks  # rows written
        self.free = [list(range(n - 1, -1, -1)) for n in self.stair_slots]  # per upper stair, popped from the end
        self.holders = [OrderedDict() for _ in self.stair_slots]  # per upper stair: its blocks, oldest arrival first
        self.moves: list[StairMove] = []  # this step's, in planning order
        self.arrived: set[int] = set()  # blocks this step writes: they must stay on stair 0 until it ends

    def stair_for_age(self, age: int) -> int:
        return next(i for i, bound in enumerate(self.bounds) if age < bound)

    # ---- one request's share of a step ----------------------------------------------------------------------
    def has_window_room(self, num_blocks: int) -> bool:
        """Whether stair 0 can take `num_blocks` more this step: free slots, and slots whose block may step down
        early (any block this step does not write)."""
        free = len(self.free[0])
        return num_blocks <= free or num_blocks <= free + sum(1 for b in self.holders[0] if b not in self.arrived)

    def blocks_to_open(self, table: list[int], start: int, num_tokens: int) -> int:
        """How many of the blocks that `num_tokens` tokens from `start` write are not on stair 0 yet (a block not
        yet allocated counts as one)."""
        bs = self.block_size
        written = range(start // bs, (start + num_tokens - 1) // bs + 1)
        return sum(1 for i in written if i >= len(table) or self.stair[table[i]] != 0)

    def schedule(self, table: list[int], start: int, num_tokens: int) -> None:
        """Plans a request's share of the step: its aged blocks step down, the blocks it writes go to stair 0."""
        self._step_down(table, start)
        self._open_window(table, start, num_tokens)

    def take_moves(self) -> list[StairMove]:
        """The step's moves, in planning order; the next step starts afresh."""
        moves, self.moves, self.arrived = self.moves, [], set()
        return moves

    # ---- planning -------------------------------------------------------------------------------------------
    def _step_down(self, table: list[int], seq_len: int) -> None:
        """Blocks whose age crossed a stair bound move down, deepest source stair first (frees before takes)."""
        bs = self.block_size
        targets: dict[int, int] = {}
        for i in range(seq_len // bs - 1, -1, -1):  # full blocks, newest first
            block = table[i]
            target = self.stair_for_age(seq_len - (i + 1) * bs)
            if target == self.floor and self.stair[block] == self.floor:
                break  # older blocks have reached the floor too
            if target > self.stair[block] and block not in self.arrived:  # a block this step writes (a prefix
                targets[block] = target                                    # another request shares) waits
        for block in sorted(targets, key=lambda b: -self.stair[b]):
            self._relocate(block, targets[block], keep_data=True)

    def _open_window(self, table: list[int], start: int, num_tokens: int) -> None:
        bs = self.block_size
        for i in range(start // bs, (start + num_tokens - 1) // bs + 1):
            block = table[i]
            if start <= i * bs:
                self.filled[block] = 0  # written from its first row: a fresh block, old contents are stale
            self.arrived.add(block)
            if self.stair[block] != 0:
                self._relocate(block, 0, keep_data=self.filled[block] > 0)
            self.filled[block] = max(self.filled[block], min(bs, start + num_tokens - i * bs))

    def _relocate(self, block: int, dst: int, keep_data: bool) -> None:
        src, src_slot = self.stair[block], self.slot[block]
        if src != self.floor:
            del self.holders[src][block]
            self.free[src].append(src_slot)
        dst_slot = block if dst == self.floor else self._take_slot(dst)
        if dst != self.floor:
            self.holders[dst][block] = None
        self.moves.append(StairMove(block, dst, dst_slot, self.filled[block] if keep_data else 0))
        self.stair[block], self.slot[block] = dst, dst_slot

    def _take_slot(self, stair: int) -> int:
        if not self.free[stair]:
            self._relocate(self._victim(stair), stair + 1, keep_data=True)
        return self.free[stair].pop()

    def _victim(self, stair: int) -> int:
        """The block to step down early from a full pool: one no request holds, else the one held longest. A block
        this step writes cannot leave stair 0 (has_window_room keeps that from happening); on a lower stair any may."""
        candidates = [b for b in self.holders[stair] if stair > 0 or b not in self.arrived]
        if not candidates:
            raise RuntimeError(f"KV stair {stair} has no slot left for this step's blocks")
        return next((b for b in candidates if not self.in_use(b)), candidates[0])

