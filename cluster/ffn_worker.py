"""FFNWorker: an actor (Ray, or a local process: cluster/actors.py) that holds the FFN halves (MLP or MoE experts)
and serves every attention worker.

Per step it reads a header from each attention worker (how many micro-batches, how many tokens each; none for a
data-parallel rank with nothing scheduled). Then for every layer and micro-batch index j it receives `ffn_input`
(and, on MoE layers, the top-k ids and weights the attention side routed) from each rank that has a micro-batch j,
runs the layer's FFN half once over all of them together — the batching across attention workers that makes the
FFN side compute-bound (Step-3) — and sends each rank its rows back, in the order the attention workers send.

With y > 1 FFN workers this one holds shard `ffn_index` of `num_ffn_workers`: a slice of every expert and of every
dense MLP (models/layers/mlp.py, moe.py), 1/y of their bytes; each MoE pass runs expert-sliced, or expert-parallel
with its experts gathered whole from the peers' slices for the pass (cluster/moe_parallel.py chooses,
cluster/expert_group.py gathers), and its outputs are partial sums the attention side adds.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from afdserve.cluster.moe_parallel import MoEParallelPlanner
from afdserve.cluster.stage_timer import StageTimer
from afdserve.cluster.step_header import STOP, decode_header, empty_header
from afdserve.cluster.expert_group import ExpertGroup
from afdserve.cluster.wire import ActivationWire
from afdserve.cluster.worker_common import build_transport, free_port, node_ip
from afdserve.engine.config import EngineConfig
from afdserve.models.hf_config import TransformerConfig, resolve_dtype
from afdserve.models.layer_loop import pipeline_order
from afdserve.models.loader import load_model, weight_bytes
from afdserve.models.layers.moe_router import Routing


class FFNWorker:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, max_model_len: int,
                 rank: int, threads: int, ffn_index: int = 0, num_ffn_workers: int = 1):
        torch.set_num_threads(threads)
        self.threads = threads
        self.rank = rank
        self.dtype = resolve_dtype(config.model.dtype, model_config, config.model.device)
        self.device = torch.device(config.model.device)
        # MLP / MoE only; several FFN workers each hold a shard, and MoE passes run expert-parallel or expert-sliced.
        shard = (ffn_index, num_ffn_workers) if num_ffn_workers > 1 else None
        self.model = load_model(model_dir, model_config, self.dtype, max_model_len, device=self.device, role="ffn",
                                ffn_shard=shard, quantization=config.model.quantization,
                                expert_cache=config.model.expert_cache)
        self.planner = MoEParallelPlanner(num_ffn_workers, config.parallel.moe_parallel) if num_ffn_workers > 1 else None
        self.ffn_index, self.num_ffn_workers = ffn_index, num_ffn_workers
        self.hidden_size = model_config.hidden_size
        self.wire = ActivationWire(config.parallel.afd_wire)
        self.transport = None
        self.expert_group: ExpertGroup | None = None
        self._thread: threading.Thread | None = None
        self.timer = StageTimer()

    def init_transport(self, kind: str, **kwargs) -> None:
        self.transport = build_transport(kind, self.rank, self.device, **kwargs)

    def init_expert_group(self, host: str, port: int) -> None:
        """Joins the FFN workers' group (every FFN worker at once; worker 0 serves the store at host:port) and
        hands each sharded MoE layer its weight gather."""
        self.expert_group = ExpertGroup(self.ffn_index, self.num_ffn_workers, host, port)
        for layer in self.model.layers:
            if layer.top_k:
                layer.mlp.experts.gather = self.expert_group.gather

    def node_ip(self) -> str:
        return node_ip()

    def free_port(self) -> int:
        return free_port()

    def start(self, attention_ranks: list[int]) -> None:
        self._thread = threading.Thread(target=self._serve, args=(attention_ranks,), daemon=True)
        self._thread.start()

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> bool:
        """Answers while the serving thread runs (the AFD executor's health check during a step)."""
        return self._thread is not None and self._thread.is_alive()

    def stage_times(self) -> dict:
        if self.expert_group is not None:
            self.timer.times.moe_gathered_bytes = self.expert_group.bytes_received
        totals = self.model.expert_cache_totals()
        self.timer.times.expert_cache = None if totals is None else asdict(totals)
        return self.timer.times.as_dict()

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    @torch.inference_mode()
    def _serve(self, peers: list[int]) -> None:
        torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread: set it in this one too
        while True:
            headers = [decode_header(self.transport.recv(empty_header(), peer)) for peer in peers]
            if any(op == STOP for op, _ in headers):
                return
            self._step({peer: tokens for peer, (_, tokens) in zip(peers, headers)})

    def _step(self, tokens_per_micro_batch: dict[int, list[int]]) -> None:
        dtype = self.dtype
        timer, transport = self.timer, self.transport

        def recv(shape, dtype, peer: int) -> torch.Tensor:
            return timer.wait(transport.recv, torch.empty(shape, dtype=dtype, device=self.device), peer)

        num_micro_batches = max(len(tokens) for tokens in tokens_per_micro_batch.values())
        if num_micro_batches == 0:
            return
        # The attention workers' schedule (models/layer_loop.run_layers), from this end of the transport.
        for index, j in pipeline_order(len(self.model.layers), num_micro_batches):
            layer = self.model.layers[index]
            k = layer.top_k
            parts = [(peer, tokens[j]) for peer, tokens in tokens_per_micro_batch.items() if j < len(tokens)]
            inputs, ids, weights = [], [], []
            for peer, n in parts:
                inputs.append(self.wire.decode(functools.partial(recv, peer=peer), n, self.hidden_size, dtype))
                if k:
                    ids.append(recv((n, k), torch.int64, peer))
                    weights.append(recv((n, k), torch.float32, peer))
            routing = Routing(_cat(ids), _cat(weights)) if k else None
            if routing is not None:
                timer.count_expert_tokens(index, routing.topk_ids, layer.mlp.experts.num_global_experts)
            if routing is not None and self.planner is not None:  # sharded experts: sliced, or parallel
                sliced = self.planner.expert_sliced(routing.topk_ids, layer.mlp.experts)
                out = timer.moe_pass(sliced, layer.ffn_half, _cat(inputs), routing, sliced)
            else:
                out = timer.compute(layer.ffn_half, _cat(inputs), routing)
            for (peer, _), rows in zip(parts, out.split([n for _, n in parts])):
                timer.send(transport.send, rows, peer)
        transport.flush()
        timer.step_done(len(self.model.layers))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
