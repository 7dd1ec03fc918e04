"""Shared fixtures: the real SmolLM2 (imported once per session into a temp cache) and tiny random models made
with transformers' save_pretrained, with transformers as the oracle; plain-torch layer references for the models
transformers lacks (PRMoE, Step-3)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models

from afdserve.models.model_path import resolve_model_path


# The installed `afdserve` command. Not `python -m`, which would put the working directory on sys.path.
AFDSERVE_COMMAND = [str(Path(sys.executable).parent / "afdserve")]


@pytest.fixture(scope="session")
def afd_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("afdserve-cache")


@pytest.fixture(scope="session")
def smollm2_dir(afd_cache) -> Path:
    return resolve_model_path("smollm2", afd_cache)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def write_byte_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer whose every id is its own token "<id>", enough for models driven by token ids."""
    tok = Tokenizer(models.BPE(vocab={f"<{i}>": i for i in range(vocab_size)}, merges=[]))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<2>"}))


TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2)


def make_tiny_model(directory: Path, arch: str, seed: int = 0, mlp_std: float | None = None, **overrides):
    """Saves a random-weight transformers model of `arch` into `directory`; returns the transformers model.
    `mlp_std` re-draws the FFN weights (MLPs, routers, experts) with that std, so that they dominate the output."""
    import transformers
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }[arch]
    config = config_cls(**{**TINY_COMMON, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_weights(model, mlp_std)
    model.save_pretrained(directory)
    write_byte_tokenizer(directory, config.vocab_size)
    return model


def make_tiny_readme(directory: Path, top_k: int, experts: int = 4, channels: int = 128):
    """A tiny random Llama (transformers, MLP width `channels`) refactored into a Read-ME MoE of `experts` experts
    (models/readme_refactor.py) on 200 random calibration tokens; returns (the dense transformers model, the Read-ME
    directory, the calibration tokens)."""
    from afdserve.models.readme_refactor import RefactorSpec, refactor_to_readme
    hf = make_tiny_model(directory / "dense", "llama", mlp_std=0.2, intermediate_size=channels)
    calibration = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    spec = RefactorSpec(num_experts=experts, shared_fraction=0.25, top_k=top_k, calibration_tokens=200,
                        router_hidden_size=16, router_intermediate_size=32)
    return hf, refactor_to_readme(directory / "dense", directory / "readme", calibration, spec), calibration


def graphed_llm(directory, sizes):
    """An engine whose decode steps go through DecodeGraphs with plain calls standing in for the graphs; returns
    it and the bucket of each replayed step."""
    from afdserve import LLM
    llm = LLM(str(directory), dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=96)
    runner = llm.engine.core.executor.runner
    runner.capture_decode_graphs(sizes, capture=False)
    replayed = []
    graphs = runner.decode_graphs.graphs
    for size, call in list(graphs.items()):
        graphs[size] = lambda size=size, call=call: (replayed.append(size), call())[1]
    return llm, replayed


def randomize_weights(model, mlp_std: float | None = None) -> None:
    with torch.no_grad():  # random biases and norms too, so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            elif mlp_std is not None and ".mlp." in name:
                p.normal_(0.0, mlp_std)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, not stopping at EOS (like ignore_eos=True; EOS may still be produced)."""
    model.generation_config.eos_token_id = None  # generate() falls back to the model's own otherwise
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + max_new_tokens
    return out[0, len(prompt):].tolist()


def generate_and_compare(llm, hf, prompts: list[list[int]], new_tokens: int, top: int, atol: float = 1e-4):
    """Runs all prompts batched through the engine with greedy sampling, logprobs and prompt logprobs, and checks
    them against transformers: the same tokens, and every reported logprob within `atol` of transformers'
    log-softmax (with transformers' top-`top` tokens among those reported). Returns the engine's outputs."""
    from afdserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=top, prompt_logprobs=top)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, new_tokens)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        # prompt_logprobs[p] is the distribution that predicted prompt token p (from position p - 1).
        positions = [(out.prompt_logprobs[p], ref[p - 1]) for p in range(1, len(prompt))]
        positions += [(lp, ref[len(prompt) - 1 + j]) for j, lp in enumerate(out.outputs[0].logprobs)]
        for reported, ref_row in positions:
            for token_id, lp in reported.items():
                assert abs(lp.logprob - ref_row[token_id].item()) < atol, (token_id, lp.logprob, ref_row[token_id])
            assert set(ref_row.topk(top).indices.tolist()) <= set(reported)
    return outs


def assert_raw_logits_match(llm, hf, tokens: list[int], prefill: int = 30, atol: float = 1e-4,
                            max_outliers: int = 0) -> None:
    """Drives the engine's runner directly: a `prefill`-token chunk, then the rest one decode step at a time; the
    raw logits at every position equal transformers' forward within `atol`, at all but `max_outliers` positions
    (a bf16 MoE: a token whose router sits on a near-tie picks other experts, in transformers' own bf16 forward too)."""
    from afdserve import SamplingParams
    from afdserve.engine.scheduler import NewRequestData, ScheduledRequest, SchedulerOutput

    runner = llm.engine.core.executor.runner
    new = NewRequestData("r", tokens, [], SamplingParams(temperature=0), frozenset())
    blocks = list(range(-(-len(tokens) // llm.engine.config.cache.block_size)))
    chunks = [(0, prefill)] + [(p, 1) for p in range(prefill, len(tokens))]
    errors = []  # per position: the largest logit error
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
        for start, n in chunks:
            item = (ScheduledRequest("r", start, n, [], blocks, False, new=new) if start == 0 else
                    ScheduledRequest("r", start, n, [], [], False))
            runner.requests.update(SchedulerOutput([item]))
            batch = runner.build_batch([item])
            hidden = runner.model(batch.input_ids, batch.positions, batch.meta, runner.kv_caches)
            logits = runner.model.compute_logits(hidden)
            errors += (logits.float() - ref[start:start + n]).abs().amax(-1).tolist()
    outliers = [(position, error) for position, error in enumerate(errors) if error > atol]
    assert len(outliers) <= max_outliers, outliers


# ---- plain-torch references written from the math (no engine code), for models without a transformers oracle -----

def ref_minmax(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """KIVI from the formula: scale = (max - min) / (2^b - 1), zero = min, both stored as fp16."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).half().float()
    zero = lo.half().float()
    return ((x - zero) / scale).round().clamp(0, 2 ** bits - 1) * scale + zero


def greedy_tokens(next_logits, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with a reference model's `next_logits(ids) -> [len(ids), V]`, recomputed from scratch."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(next_logits(ids)[-1].argmax()))
    return ids[len(prompt):]


def assert_outputs_match_reference(outs, prompts, new_tokens: int, next_logits) -> None:
    """Engine outputs (greedy, logprobs=1) of `prompts` against a reference model's `next_logits(ids) -> [len(ids),
    V]`: the same greedy tokens, and every sampled token's logprob within 1e-4."""
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        assert tokens == greedy_tokens(next_logits, prompt, new_tokens)
        with torch.no_grad():
            ref = next_logits(prompt + tokens).log_softmax(-1)
        for j, (token, lp) in enumerate(zip(tokens, out.outputs[0].logprobs)):
            assert abs(lp[token].logprob - ref[len(prompt) - 1 + j, token].item()) < 1e-4


def swiglu(x, gate, up, down):
    return down @ (F.silu(gate @ x) * (up @ x))


def moe_token(x, gate_w, experts, top_k, renormalize, residual=None):
    """One token through an MoE layer. experts: [(gate, up, down)]; residual: (gate, up, down, coef_w, coef_b)."""
    probs = torch.softmax(gate_w @ x, dim=0)
    chosen = sorted(range(len(experts)), key=lambda e: (-probs[e].item(), e))[:top_k]
    weights = [probs[e] for e in chosen]
    if renormalize:
        weights = [w / sum(weights) for w in weights]
    out = sum(w * swiglu(x, *experts[e]) for w, e in zip(weights, chosen))
    if residual is None:
        return out
    *mlp, coef_w, coef_b = residual
    c = torch.softmax(coef_w @ x + coef_b, dim=0)
    return out * c[0] + swiglu(x, *mlp) * c[1]


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x, positions, theta):
    """x [T, heads, d], neox layout (the two halves rotate together)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = positions[:, None].float() * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rotated * sin
