"""The FFN workers' own collective: whole experts gathered from the workers' slices for an expert-parallel pass.

With y FFN workers each holds slice f of every expert (models/layers/moe.py, Tutel's identical layout). An
expert-parallel pass needs worker f's experts whole: every worker sends each peer its slice of that peer's experts
and joins the slices it receives with its own, in shard order. Every worker sees the same routing and so makes the
same choice of mode (cluster/moe_parallel.py): all of them run this exchange in the same pass, with nothing to agree
on first. A gloo process group of the FFN workers alone, separate from the A<->F transport (gloo or shared memory).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from afdserve.cluster.transport import as_bytes, byte_view
from afdserve.models.layers.mlp import shard_range
from afdserve.models.layers.moe import Experts, join_slices


class ExpertGroup:
    def __init__(self, index: int, world: int, host: str, port: int, timeout_s: float = 600):
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=index == 0, timeout=timeout)
        self.group = dist.ProcessGroupGloo(store, index, world, timeout)
        self.index, self.world = index, world
        self.bytes_received = 0  # weight bytes gathered so far: the price of the expert-parallel passes

    def gather(self, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole w13 [n, 2I, H] and w2 [n, H, I] of this worker's experts [lo, hi)."""
        num_experts, inter = experts.num_global_experts, experts.intermediate_size
        sends = []
        for peer in self._peers():
            for tag, part in enumerate(experts.slice_of(*shard_range(num_experts, peer, self.world))):
                payload = as_bytes(part.contiguous()).cpu()  # gloo moves host bytes: bf16 too, a GPU slice staged
                sends.append((self.group.send([payload], peer, tag), payload))
        lo, hi = experts.local_experts
        own_w13, own_w2 = experts.slice_of(lo, hi)
        slices = []
        for rank in range(self.world):
            if rank == self.index:
                slices.append((own_w13, own_w2))
                continue
            s_lo, s_hi = shard_range(inter, rank, self.world)
            w13 = own_w13.new_empty(hi - lo, 2 * (s_hi - s_lo), own_w13.shape[2])
            w2 = own_w2.new_empty(hi - lo, own_w2.shape[1], s_hi - s_lo)
            for tag, out in enumerate((w13, w2)):
                host = out if out.device.type == "cpu" else torch.empty_like(out, device="cpu")
                self.group.recv([byte_view(host)], rank, tag).wait()
                if host is not out:
                    out.copy_(host)
                self.bytes_received += out.numel() * out.element_size()
            slices.append((w13, w2))
        for work, _ in sends:
            work.wait()
        return join_slices(slices)

    def _peers(self) -> list[int]:
        return [r for r in range(self.world) if r != self.index]
