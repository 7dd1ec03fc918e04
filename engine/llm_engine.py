"""LLMEngine: the synchronous engine — input processing, the EngineCore, and output processing in one object.

    add_request(id, prompt, params) -> validate, tokenize, fan out n children -> EngineCore.add_request
    step() -> EngineCore.step() -> OutputProcessor.process() -> RequestOutputs (stop strings end requests here)
"""
from __future__ import annotations

import dataclasses
import itertools
import logging

import torch

from afdserve.engine.config import EngineConfig
from afdserve.engine.engine_core import EngineCore
from afdserve.engine.expert_batching import ExpertBatching
from afdserve.engine.executor import make_executor
from afdserve.engine.model_runner import kv_cache_spec_for
from afdserve.engine.output_processor import OutputProcessor
from afdserve.engine.outputs import RequestOutput
from afdserve.engine.request import Request
from afdserve.engine.request_cost import CostMeter
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.tokenizer import Tokenizer
from afdserve.models.hf_config import load_transformer_config, resolve_dtype
from afdserve.models.model_path import default_cache_dir, resolve_model_path
from afdserve.models.readme import READ_ME_ARCHITECTURE, token_expert_table

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model_path(config.model.model, config.model.cache_dir or default_cache_dir())
        self.model_config = load_transformer_config(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        checkpoint_dtype = str(self.model_config.torch_dtype).removeprefix("torch.")
        run_dtype = resolve_dtype(config.model.dtype, self.model_config, config.model.device)
        run_dtype = str(run_dtype).removeprefix("torch.")
        if config.model.dtype == "auto" and run_dtype != checkpoint_dtype:
            logger.warning("this CPU has no native %s kernels (torch sees %s): dtype auto runs %s; --dtype %s forces "
                           "it", checkpoint_dtype, torch.backends.cpu.get_cpu_capability(), run_dtype, checkpoint_dtype)
        if config.model.quantization == "fp8" and torch.device(config.model.device).type == "cpu":
            logger.warning("quantization fp8 is a Hopper format: a CPU runs its e4m3 products in oneDNN's emulation "
                           "(SmolLM2 bf16, batch 1: 452 ms a token against 24 ms unquantized on an AVX-512 EPYC); "
                           "int8 or int4 are the CPU's formats")
        self._check_latent_cache()
        self.kv_spec = kv_cache_spec_for(config, self.model_config)
        # The engine's own attention policy, checked against the model before any worker starts.
        self._check_attention_policy(config.model.attention_policy_spec)
        self.num_kv_blocks = self._num_kv_blocks()
        self.max_model_len = self._max_model_len()
        if self.kv_spec.stairs and self.kv_spec.max_seqs < config.scheduler.max_num_seqs:
            logger.warning("kv_cache_dtype %s: its stair pools hold the windows of %d sequences, so %d of max_num_seqs "
                           "%d run at once; raise kv_cache_memory_gb for more", config.cache.kv_cache_dtype,
                           self.kv_spec.max_seqs, self.kv_spec.max_seqs, config.scheduler.max_num_seqs)
        executor = make_executor(config, self.model_dir, self.model_config, self.num_kv_blocks, self.max_model_len)
        cost_meter = CostMeter.for_model(self.model_config, self.kv_spec.block_bytes / config.cache.block_size)
        self.core = EngineCore(config, executor, self.num_kv_blocks, self.max_model_len, self.kv_spec, cost_meter,
                               self._expert_batching())
        self.output_processor = OutputProcessor(self.tokenizer)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self._ids = itertools.count()

    def _expert_batching(self) -> ExpertBatching | None:
        """--expert-batch-size: the scheduler's expert-aware batching, with the router's vocab -> experts table."""
        sched = self.config.scheduler
        if sched.expert_batch_size is None:
            return None
        if self.model_config.architecture != READ_ME_ARCHITECTURE:
            raise ValueError(f"expert_batch_size: set, but {self.model_config.architecture} has no pre-gating router; "
                             f"expert batching needs a {READ_ME_ARCHITECTURE} (afdserve readme-refactor), whose "
                             f"token's experts follow from the token")
        return ExpertBatching(token_expert_table(self.model_dir), sched.expert_batch_size, sched.expert_batch_max_wait)

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        return max(1, self.kv_spec.num_blocks(cache.kv_cache_memory_gb * 2**30))

    def _max_model_len(self) -> int:
        cfg = self.model_config
        limits = [self.config.model.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings,
                  self.num_kv_blocks * self.config.cache.block_size]
        # Within the sliding window every layer attends to everything, so capping the length keeps us exact.
        if cfg.sliding_window:
            limits.append(cfg.sliding_window)
        return min(limits)

    # ---- requests -------------------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_params(params)
        prompt_text, prompt_ids = self._tokenize_prompt(prompt)
        max_tokens = self._max_tokens(params, len(prompt_ids))
        child_params = [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                        for i in range(params.n)]
        child_ids = self.output_processor.add_request(request_id, prompt_text, prompt_ids, params, child_params)
        for cid, cparams in zip(child_ids, child_params):
            self.core.add_request(Request(cid, prompt_ids, cparams, self.eos_token_ids, max_tokens))

    def _tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
            return prompt, ids
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        self.check_token_ids(ids, "prompt token ids")
        return None, ids

    def check_token_ids(self, token_ids: list[int], field: str) -> None:
        """Every id names a token of this model's vocabulary (the server checks its inputs with this too)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{field} must be integers in [0, {vocab}), got {bad[:3]}")

    def check_params(self, params: SamplingParams) -> None:
        """The checks that need the model (SamplingParams makes the rest): a bad value here would fail a whole step.
        The server runs them before it answers, so a streaming request gets the same 400 as a non-streaming one."""
        vocab = self.model_config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name} must be at most the vocabulary size {vocab}, got {k}")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_token_ids(list(params.logit_bias), "logit_bias keys")
        if params.attention_policy is not None:
            self._check_attention_policy(params.attention_policy)

    def _check_attention_policy(self, policy: dict) -> None:
        """What a policy spec (already checked on its own) needs of this engine: a KV cache addressed by block id,
        and the layers it names."""
        if policy["name"] == "dense":
            return
        if self.model_config.kv_entry.planes == 1:
            raise ValueError(f"attention_policy {policy['name']!r} selects K pages per KV head; "
                             f"{self.model_config.architecture}'s MLA cache holds latents, read whole (dense)")
        if self.config.cache.kv_cache_dtype in ("int4", "saq"):
            raise ValueError(f"attention_policy {policy['name']!r} picks KV blocks by id, which this server's "
                             f"kv_cache_dtype {self.config.cache.kv_cache_dtype!r} moves between stores")
        layers = policy.get("full_layers") or ()
        if any(layer >= self.model_config.num_layers for layer in layers):
            raise ValueError(f"attention_policy full_layers {list(layers)} name a layer this model (of "
                             f"{self.model_config.num_layers}) does not have")

    def _check_latent_cache(self) -> None:
        """MLA (DeepSeek-V2/V3) caches one latent a token, in the model dtype (kernels/attention/mla_paged.py): no
        quantized KV formats."""
        if self.model_config.kv_entry.planes != 1:
            return
        arch, cache = self.model_config.architecture, self.config.cache
        if cache.kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype {cache.kv_cache_dtype!r} quantizes K and V; {arch}'s MLA cache holds "
                             f"latents, which run with kv_cache_dtype 'auto' only")

    def _max_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt is {prompt_len} tokens; the context length is {self.max_model_len}, "
                             f"which leaves no room for output")
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:  # the server's 400, not a silently shorter output
            raise ValueError(f"prompt is {prompt_len} tokens and max_tokens {params.max_tokens}: "
                             f"{prompt_len + params.max_tokens} tokens, over the context length {self.max_model_len}")
        return params.max_tokens

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort(request_id))

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def reset_prefix_cache(self) -> None:
        self.core.reset_prefix_cache()

    def step(self) -> list[RequestOutput]:
        outputs, stops = self.output_processor.process(self.core.step())
        for child_id, stop in stops:
            self.core.finish_request(child_id, stop)
        return outputs

    def shutdown(self) -> None:
        self.core.shutdown()
