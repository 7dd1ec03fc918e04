"""The A<->F data plane: point-to-point tensor messages between an attention worker and an FFN worker.

Ray starts and supervises the workers; per-layer tensors never go through Ray. The transports sit behind one small
interface, chosen by measurement (`afdserve bench transport`, bench/transport.py; on a GPU through
bench/gpu/transport_check.py):

  ProcessGroupTransport  torch.distributed isend/recv: gloo over TCP (any hosts), or NCCL between GPUs.
  ShmTransport           a shared-memory ring per direction with sequence counters: one host, no syscalls a message.

Both deliver messages between a pair of workers in order. `send` may return before the peer has read the message;
`recv` fills the given tensor and returns once the message is there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist


class Transport(Protocol):
    def send(self, tensor: torch.Tensor, peer: int) -> None: ...

    def recv(self, out: torch.Tensor, peer: int) -> torch.Tensor: ...

    def flush(self) -> None:
        """Waits until every message sent so far has left this worker's buffers."""

    def close(self) -> None: ...


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).view(-1)


def byte_view(out: torch.Tensor) -> torch.Tensor:
    """The bytes of a receive buffer, written in place: the buffer must be contiguous."""
    if not out.is_contiguous():
        raise ValueError("receive buffers must be contiguous")
    return out.view(torch.uint8).view(-1)


# ---- torch.distributed: gloo (host memory, TCP) and NCCL (GPU memory, NVLink / PCIe / IB) ----------------------------
class ProcessGroupTransport:
    """Point-to-point isend / recv in one torch.distributed process group of the deployment's workers.

    gloo moves host tensors; NCCL moves tensors on this worker's GPU (the vLLM AFD plugin's and StepMesh's choice).
    A message anywhere else is staged on the backend's side (a GPU tensor through the host for gloo, a host tensor
    onto the GPU for NCCL), and so is a receive buffer, so callers pass the same tensors to either backend.
    Messages go as bytes, which also covers bf16 and fp8."""

    def __init__(self, rank: int, world_size: int, init_method: str, backend: str = "gloo",
                 device: torch.device | str | None = None, timeout_s: float = 600):
        import datetime
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"a process-group transport runs gloo or nccl, got {backend!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if backend == "nccl":
            if device.type != "cuda":
                raise ValueError(f"the nccl transport moves GPU tensors; this worker's device is {device}")
            torch.cuda.set_device(device)
        self.wire_device = device if backend == "nccl" else torch.device("cpu")  # where the backend reads bytes
        extra = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **extra)
        self.rank, self.backend = rank, backend
        self._pending: list = []

    def _staged(self, payload: torch.Tensor) -> torch.Tensor:
        return payload if payload.device == self.wire_device else payload.to(self.wire_device)

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        payload = self._staged(as_bytes(tensor))
        self._pending.append((dist.isend(payload, peer), payload))  # kept alive until flush

    def recv(self, out: torch.Tensor, peer: int) -> torch.Tensor:
        view = byte_view(out)
        buffer = self._staged(view)
        dist.recv(buffer, peer)
        if buffer is not view:
            view.copy_(buffer)
        return out

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- shared memory ------------------------------------------------------------------------------------------------
@dataclass
class ShmChannelSpec:
    name: str
    slots: int
    slot_bytes: int
    # False where the openers are the creator's own children (torch.multiprocessing), which share its resource
    # tracker: there an opener's unregister would take the creator's registration away.
    opener_untracks: bool = True


_HEADER = 16  # per slot: int64 sequence number written by the sender, int64 ack written by the receiver


class _ShmChannel:
    """One direction between two workers: a ring of slots; slot i holds message k where k % slots == i."""

    def __init__(self, spec: ShmChannelSpec, create: bool):
        size = spec.slots * (_HEADER + spec.slot_bytes)
        self.shm = shared_memory.SharedMemory(name=spec.name, create=create, size=size if create else 0)
        if not create and spec.opener_untracks:
            # Python < 3.13 registers attached segments too, and a worker's tracker would unlink them when the
            # worker dies: the creator (the executor) owns the segment's lifetime.
            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.spec = spec
        buf = np.ndarray((spec.slots, _HEADER + spec.slot_bytes), dtype=np.uint8, buffer=self.shm.buf)
        if create:
            buf[:] = 0
        self.headers = [buf[i, :_HEADER].view(np.int64) for i in range(spec.slots)]  # [seq, ack]
        self.payloads = [torch.from_numpy(buf[i, _HEADER:]) for i in range(spec.slots)]
        self.sent = 0
        self.received = 0

    def put(self, tensor: torch.Tensor) -> None:
        data = as_bytes(tensor)
        if data.numel() > self.spec.slot_bytes:
            raise ValueError(f"message of {data.numel()} bytes exceeds the shm slot size {self.spec.slot_bytes}")
        slot, seq = self.sent % self.spec.slots, self.sent + 1
        header = self.headers[slot]
        _spin_until(lambda: header[1] >= seq - self.spec.slots)  # the slot's previous message was read
        self.payloads[slot][:data.numel()].copy_(data)
        header[0] = seq  # x86 stores are seen in order: the payload is visible before the sequence number
        self.sent = seq

    def get(self, out: torch.Tensor) -> torch.Tensor:
        slot, seq = self.received % self.spec.slots, self.received + 1
        header = self.headers[slot]
        _spin_until(lambda: header[0] >= seq)
        view = byte_view(out)
        view.copy_(self.payloads[slot][:view.numel()])
        header[1] = seq
        self.received = seq
        return out

    def close(self, unlink: bool) -> None:
        self.headers.clear()
        self.payloads.clear()
        self.shm.close()
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:  # already gone: nothing to release
                pass


def _spin_until(ready, timeout_s: float = 600.0) -> None:
    """Busy-waits briefly, then yields the core: a peer on the other core answers in microseconds."""
    for _ in range(2000):
        if ready():
            return
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("shared-memory peer did not answer")
        time.sleep(0)


class ShmTransport:
    """Channels are created by the driver (`create_channels`) and opened by both workers by name."""

    def __init__(self, rank: int, channels: dict[tuple[int, int], ShmChannelSpec]):
        self.rank = rank
        self._out = {dst: _ShmChannel(spec, create=False) for (src, dst), spec in channels.items() if src == rank}
        self._in = {src: _ShmChannel(spec, create=False) for (src, dst), spec in channels.items() if dst == rank}

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._out[peer].put(tensor)

    def recv(self, out: torch.Tensor, peer: int) -> torch.Tensor:
        return self._in[peer].get(out)

    def flush(self) -> None:
        pass  # put() copies into shared memory before returning

    def close(self) -> None:
        for ch in [*self._out.values(), *self._in.values()]:
            ch.close(unlink=False)


def create_shm_channels(pairs: list[tuple[int, int]], slots: int, slot_bytes: int, prefix: str,
                        opener_untracks: bool = True
                        ) -> tuple[dict[tuple[int, int], ShmChannelSpec], list[_ShmChannel]]:
    """Creates one channel per (src, dst) pair; the caller keeps the returned handles and unlinks them at shutdown."""
    specs, handles = {}, []
    for src, dst in pairs:
        spec = ShmChannelSpec(f"{prefix}-{src}-{dst}", slots, slot_bytes, opener_untracks)
        handles.append(_ShmChannel(spec, create=True))
        specs[(src, dst)] = spec
    return specs, handles
