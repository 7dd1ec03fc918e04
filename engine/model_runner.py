"""ModelRunner: owns the model and its KV cache; turns a SchedulerOutput into one forward pass and samples.

Flat batch (docs/architecture.md, seam 2): the step's chunks are laid end to end with no padding, decodes first:
    input_ids[T], positions[T], slot_mapping[T]; per sequence its blocks; logits only at the rows that need them.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afdserve.engine.config import EngineConfig, parse_cuda_graph_sizes
from afdserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from afdserve.engine.request_state import RequestState, RequestStates
from afdserve.engine.sampler import Sampler, TokenLogprobs, prompt_logprobs_for_chunk
from afdserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from afdserve.kernels.attention import AttentionMetadata, PrefillSeq, kv_cache_shape, select_attention_backend
from afdserve.kernels.attention.kv_quant import KVShape, QuantizedKVCache
from afdserve.kernels.attention.kv_tiers import KVCacheSpec, KVStairView, KVStepPlan, kv_cache_spec
from afdserve.kernels.attention.sparse.policy import AttentionPolicy, KVLayout, PolicyStep, SparseStep
from afdserve.kernels.attention.sparse.registry import AttentionPolicies
from afdserve.kernels.attention.sparse.selection import DecodeBatch
from afdserve.kernels.attention.torch_paged import decode_mask_bias
from afdserve.models.hf_config import TransformerConfig, resolve_dtype
from afdserve.models.loader import load_model

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    sampled: list[int | None]  # per scheduled request, in the scheduler's order; None: mid-prompt chunk
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # request id -> this chunk's

    @classmethod
    def empty(cls, num_scheduled: int) -> "ModelRunnerOutput":
        return cls([None] * num_scheduled, [None] * num_scheduled)

    def fill_from(self, part: "ModelRunnerOutput", indices: list[int]) -> None:
        """Places the output of a sub-batch (micro-batch, attention rank) whose i-th request was indices[i]."""
        for local, i in enumerate(indices):
            self.sampled[i], self.logprobs[i] = part.sampled[local], part.logprobs[local]
        self.prompt_logprobs.update(part.prompt_logprobs)


@dataclass
class FlatBatch:
    order: list[int]  # scheduled index for each sequence in batch order (decodes first)
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: list[tuple[int, int]]  # per batch sequence: (first row, count) whose logits are needed
    wants_prompt_logprobs: list[bool]  # per batch sequence


def kv_cache_spec_for(config: EngineConfig, model_config: TransformerConfig) -> KVCacheSpec:
    """The KV format's bytes per block and fixed pools: sizes the block pool (LLMEngine) and the caches (runner)."""
    cache, sched = config.cache, config.scheduler
    planes, heads, head_dim = model_config.kv_entry
    shape = KVShape(heads, cache.block_size, head_dim, resolve_dtype(config.model.dtype, model_config,
                                                                      config.model.device), planes)
    return kv_cache_spec(cache.kv_cache_dtype, shape, model_config.num_layers, cache.kv_window, cache.stairs,
                         sched.max_num_seqs, sched.max_num_batched_tokens, cache.kv_cache_memory_gb * 2**30)


class ModelRunner:
    model_role: str | None = None  # the whole model; an AFD attention worker's runner keeps the attention side

    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int, rank: int = 0):
        self.config = config
        self.rank = rank  # the attention rank whose KV cache this is (data-parallel attention)
        self.model_config = model_config
        self.block_size = config.cache.block_size
        self.dtype = resolve_dtype(config.model.dtype, model_config, config.model.device)
        self.device = torch.device(config.model.device)
        self.kv_caches, self.kv_stairs = self._allocate_kv_caches(num_kv_blocks)
        # Where a block's new tokens are written: at its id (a range indexes as the identity), or for int4 / saq at
        # its slot on the full-precision stair, which the staircase view keeps current.
        self.write_slot_of = self.kv_stairs.slot if self.kv_stairs else range(num_kv_blocks)
        attention = select_attention_backend(config.model.attention_backend, self.device)
        self.model = load_model(model_dir, model_config, self.dtype, max_model_len, attention, self.device,
                                self.model_role, quantization=config.model.quantization,
                                expert_cache=config.model.expert_cache)
        self.attention_policies, self.default_policy = self._attention_policies(num_kv_blocks)
        self.sampler = Sampler()
        self.default_generator = torch.Generator(self.device).manual_seed(config.model.seed)
        self.requests = RequestStates()  # what this runner knows of each request, kept from the step messages
        self.max_model_len = max_model_len
        self.decode_graphs: DecodeGraphs | None = None
        if self._can_capture_graphs():
            self.capture_decode_graphs(graph_batch_sizes(parse_cuda_graph_sizes(config.model.cuda_graph_sizes),
                                                         config.scheduler.max_num_seqs))

    def _can_capture_graphs(self) -> bool:
        """CUDA graphs for decode steps: on CUDA unless --enforce-eager, for the whole model in this process on a
        plain KV cache (an AFD worker's step waits on its peers between layers)."""
        return (self.device.type == "cuda" and not self.config.model.enforce_eager and self.model_role is None
                and self.kv_stairs is None and isinstance(self.kv_caches[0], torch.Tensor))

    def capture_decode_graphs(self, sizes: tuple[int, ...], capture: bool = True) -> None:
        """Captures one decode graph per batch size (engine/cuda_graphs.py); capture=False stands a plain call in
        for each graph (the CPU tests). A capture that fails leaves the engine eager, with a warning."""
        start = time.perf_counter()
        max_blocks = -(-self.max_model_len // self.block_size)
        try:
            with torch.inference_mode():  # as execute() runs: no autograd state recorded into the graphs
                self.decode_graphs = DecodeGraphs(self._forward_hidden, sizes, max_blocks, self.block_size,
                                                  self.pad_block, self.device, capture)
        except Exception as e:  # noqa: BLE001 - any failure to capture means eager steps, not a dead engine
            logger.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s", type(e).__name__, e)
            self.decode_graphs = None
            return
        if capture:
            logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", ",".join(map(str, sizes)),
                        time.perf_counter() - start)

    def _forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta, self.kv_caches)

    def _attention_policies(self, num_blocks: int) -> tuple[AttentionPolicies, dict]:
        """The policies requests may name, and the engine's (--attention-policy) for those that name none."""
        model, cfg = self.config.model, self.model_config
        _, heads, head_dim = cfg.kv_entry
        layout = KVLayout(cfg.num_layers, num_blocks, self.block_size, heads, head_dim, self.dtype,
                          self.device)
        return AttentionPolicies(layout, self.kv_caches), model.attention_policy_spec

    def _allocate_kv_caches(self, num_blocks: int) -> tuple[list, KVStairView | None]:
        """Per layer a plain [2, kvh, blocks + 1, bs, hd] tensor (MLA: [1, 1, blocks + 1, bs, latent]), or a
        QuantizedKVCache for --kv-cache-dtype; the int4 / saq staircase's view (each block's stair and slot) is
        shared by all layers. A plain cache's block past the pool's (`pad_block`) is written only by the padding
        rows of a CUDA graph's batch."""
        spec = kv_cache_spec_for(self.config, self.model_config)
        layers = range(self.model_config.num_layers)
        self.pad_block = num_blocks
        if spec.fmt == "auto":
            planes, heads, head_dim = self.model_config.kv_entry
            shape = kv_cache_shape(num_blocks + 1, self.block_size, heads, head_dim, planes)
            return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in layers], None
        bits = [b for _, b in spec.stairs]
        caches = [QuantizedKVCache(spec.shape, spec.fmt, num_blocks, bits, list(spec.stair_slots), self.device)
                  for _ in layers]
        stairs = KVStairView(num_blocks, floor=len(spec.stairs) - 1) if spec.stairs else None
        return caches, stairs

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.requests.update(sched)
        kv_plan = self.plan_kv_moves(sched)
        batch = self.build_batch(sched.scheduled, kv_plan)
        if self._replays(batch.meta):
            hidden = self.decode_graphs.run(batch.input_ids, batch.positions, batch.meta)
        else:
            hidden = self._forward_hidden(batch.input_ids, batch.positions, batch.meta)
        return self.sample(sched.scheduled, batch, self.compute_logits(batch, hidden))

    def _replays(self, meta: AttentionMetadata) -> bool:
        """Whether this step runs as a captured decode graph: decodes alone, dense attention, a bucket that fits."""
        return (self.decode_graphs is not None and meta.num_decodes > 0 and not meta.prefills
                and meta.sparse is None and meta.kv_plan is None
                and self.decode_graphs.bucket(meta.num_decodes) is not None)

    def compute_logits(self, batch: "FlatBatch", hidden: torch.Tensor) -> torch.Tensor:
        rows = self._tensor([r for first, count in batch.logits_rows for r in range(first, first + count)])
        return self.model.compute_logits(hidden[rows])

    # ---- batch ----------------------------------------------------------------------------------------------
    def plan_kv_moves(self, sched: SchedulerOutput) -> KVStepPlan | None:
        """int4 / saq: this step's staircase moves, replayed by every layer before its first write; None otherwise."""
        if self.kv_stairs is None:
            return None
        return self.kv_stairs.replay(sched.kv_moves.get(self.rank, []))

    def build_batch(self, scheduled: list[ScheduledRequest], kv_plan: KVStepPlan | None = None) -> FlatBatch:
        # Decodes first, grouped by attention policy (dense first), so that each policy's rows are contiguous; then
        # prefills, dense first (the Triton backend runs those as one varlen batch).
        policies = [self._policy_of(item) for item in scheduled]
        group_of: dict[int, int] = {}
        for policy in policies:
            if policy is not None:
                group_of.setdefault(id(policy), len(group_of))
        order = sorted(range(len(scheduled)), key=lambda i: (scheduled[i].num_tokens != 1,
                                                             group_of.get(id(policies[i]), -1)))
        bs = self.block_size
        input_ids, positions, slots, logits_rows, wants_prompt = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        decode_seeds, decode_steps, decode_states = [], [], []  # what attention policies may read of a decode
        write_slot = self.write_slot_of
        for i in order:
            item = scheduled[i]
            state = self.requests[item.request_id]
            start, n, blocks = item.start_pos, item.num_tokens, state.block_ids
            row = len(input_ids)
            input_ids += state.token_ids(start, n)
            pos = range(start, start + n)
            positions += pos
            slots += [write_slot[blocks[p // bs]] * bs + p % bs for p in pos]
            seq_len = start + n
            if n == 1:
                decode_tables.append(blocks)
                decode_lens.append(seq_len)
                decode_seeds.append(state.sampling_params.seed or 0)
                decode_steps.append(start - state.num_prompt_tokens)  # decodes the request ran before this one
                decode_states.append(state.policy_state)
            else:
                prefills.append(PrefillSeq(row, n, seq_len, self._tensor(blocks[:-(-seq_len // bs)]), policies[i],
                                           state.sampling_params.seed or 0))
            wants_prompt_logprobs = bool(self._prompt_logprob_positions(item))
            wants_prompt.append(wants_prompt_logprobs)
            logits_rows.append((row, n) if wants_prompt_logprobs else (row + n - 1, 1))
        # A decode needs only the blocks that hold its tokens; pad every table to the longest of them.
        max_blocks = -(-max(decode_lens, default=0) // bs)
        seq_lens = self._tensor(decode_lens)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            block_size=bs,
            num_decodes=len(decode_lens),
            decode_block_tables=self._tensor([t[:max_blocks] + [0] * (max_blocks - len(t)) for t in decode_tables]
                                             ).view(len(decode_tables), max_blocks),
            decode_mask_bias=decode_mask_bias(seq_lens, max_blocks * bs),
            prefills=prefills,
            decode_seq_lens=seq_lens,
            kv_plan=kv_plan,
        )
        if self.attention_policies.states or group_of:
            meta.sparse = self._sparse_step([policies[i] for i in order[:len(decode_lens)]], meta,
                                            self._tensor(decode_seeds), decode_steps, decode_states)
        return FlatBatch(order, self._tensor(input_ids), self._tensor(positions), meta, logits_rows, wants_prompt)

    def _policy_of(self, item: ScheduledRequest) -> AttentionPolicy | None:
        """The request's attention policy for this step: for a decode, or for a prefill chunk where the policy has a
        prefill of its own; None: dense."""
        spec = self.requests[item.request_id].sampling_params.attention_policy
        if spec is None and self.default_policy["name"] == "dense":
            return None  # the common case, without a lookup per request
        policy = self.attention_policies.get(spec or self.default_policy)
        if item.num_tokens != 1 and (policy is None or not policy.has_prefill):
            return None
        return policy

    def _sparse_step(self, decode_policies: list, meta: AttentionMetadata, seeds: torch.Tensor,
                     steps: list[int], states: list[dict]) -> SparseStep:
        """The policy states to keep current, and each policy's run of decode rows with its view of them."""
        step = SparseStep(list(self.attention_policies.states.values()))
        start = 0
        for _, rows in itertools.groupby(decode_policies, key=id):
            rows = list(rows)
            policy = rows[0]
            stop = start + len(rows)
            if policy is not None:
                rows_of = slice(start, stop)
                decodes = DecodeBatch(meta.decode_block_tables[rows_of], meta.decode_seq_lens[rows_of],
                                      meta.block_size, seeds[rows_of], decode_steps=steps[rows_of],
                                      request_states=states[rows_of])
                step.groups.append(PolicyStep(policy, start, stop, decodes, self.attention_policies.stats))
            start = stop
        return step

    def _tensor(self, values: list) -> torch.Tensor:
        """A long tensor on the runner's device, built from host lists in one copy."""
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    # ---- sampling -------------------------------------------------------------------------------------------
    def sample(self, scheduled: list[ScheduledRequest], batch: FlatBatch, logits: torch.Tensor) -> ModelRunnerOutput:
        out = ModelRunnerOutput.empty(len(scheduled))
        last_rows, sampling_items = [], []
        offset = 0
        for i, (_, count), wants_prompt in zip(batch.order, batch.logits_rows, batch.wants_prompt_logprobs):
            item = scheduled[i]
            chunk_logits = logits[offset:offset + count]
            offset += count
            if wants_prompt:
                self._prompt_logprobs(item, chunk_logits, out)
            if item.samples:
                last_rows.append(offset - 1)
                sampling_items.append(i)
        if sampling_items:
            requests = [self.requests[scheduled[i].request_id] for i in sampling_items]
            generators = [self._generator(r) for r in requests]
            tokens, logprobs = self.sampler(logits[last_rows], requests, generators)
            for i, tok, lp in zip(sampling_items, tokens, logprobs):
                out.sampled[i], out.logprobs[i] = tok, lp
        return out

    def _prompt_logprob_positions(self, item: ScheduledRequest) -> range:
        """The chunk's positions whose prompt logprobs are still owed; position p predicts prompt token p + 1.

        A recompute after preemption covers positions already given (and output tokens): those are skipped."""
        request = self.requests[item.request_id]
        if request.sampling_params.prompt_logprobs is None:
            return range(0)
        first = max(item.start_pos, request.num_prompt_logprobs_sent)
        return range(first, min(item.start_pos + item.num_tokens, request.num_prompt_tokens - 1))

    def _prompt_logprobs(self, item: ScheduledRequest, chunk_logits: torch.Tensor, out: ModelRunnerOutput) -> None:
        request = self.requests[item.request_id]
        positions = self._prompt_logprob_positions(item)
        rows = chunk_logits[positions.start - item.start_pos:positions.stop - item.start_pos]
        targets = request.prompt_token_ids[positions.start + 1:positions.stop + 1]
        out.prompt_logprobs[request.request_id] = prompt_logprobs_for_chunk(
            rows, targets, request.sampling_params.prompt_logprobs)
        request.num_prompt_logprobs_sent = positions.stop

    def _generator(self, request: RequestState) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self.default_generator
        if request.generator is None:
            request.generator = torch.Generator(self.device).manual_seed(seed)
        return request.generator
