"""Sparse attention policies on a real model: accuracy next to the tokens they read and the time they take.

Per context length and policy (kernels/attention/sparse; "dense" reads every page):
- perplexity of decodes: the first `context - scored_tokens` tokens of English text (`pydoc_data.topics`) are
  prefilled in chunks (dense: policies act on decodes), then the last `scored_tokens` are fed one decode step at a
  time, teacher-forced, each step scoring the next text token. The runner is driven directly, as a decode-only
  scorer: the public API scores prompt tokens only through prefill. The prefill is shared by the policies (their
  decodes overwrite the same tail slots), so it is timed once;
- attended fraction: tokens the decodes read over tokens they hold, over all layers (full layers count whole);
- unread pages: the pages no layer or head read in a step, over the pages held: the most a host-memory tier could
  keep off the device for that step;
- decode time: median milliseconds of one scored decode step, batch 1;
- prefill (dense, and each policy with a prefill of its own: HyperAttention's): the text's first `context` tokens as
  one prefill chunk, its median seconds over `prefill_reps` runs and the perplexity of the text's last half scored
  from the prefill's own logits (HyperAttention's causal recursion approximates only the rows past its first
  min_seq_len); and one layer's prefill attention alone at the model's shape (random inputs), median milliseconds;
- passkey retrieval: a random 5-digit key stated once at a depth (a fraction of the filler) of a prompt of about
  `context` tokens, the filler the sentences of the passkey tests of Mohtashami and Jaggi (2023); a trial passes
  when the key is in the 8 greedy tokens after "What is the pass key? The pass key is". The dense request runs
  first, so the decode-only policies find its prompt in the prefix cache and share its prefill (a policy with its
  own prefill computes its own).
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from afdserve.bench.kv_quant import english_text
from afdserve.engine.config import EngineConfig
from afdserve.engine.llm import LLM
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.scheduler import NewRequestData, ScheduledRequest, SchedulerOutput
from afdserve.kernels.attention import PrefillSeq, kv_cache_shape
from afdserve.kernels.attention.sparse.policy import AttendedTokens
from afdserve.kernels.attention.sparse.registry import policy_spec
from afdserve.kernels.attention.torch_paged import policy_prefill, prefill_attention

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class SparseBenchSpec:
    policies: tuple[dict, ...] = ({"name": "dense"}, {"name": "quest"}, {"name": "delta"}, {"name": "prflash"})
    contexts: tuple[int, ...] = (2048, 4096, 8192)
    scored_tokens: int = 128
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    trials: int = 20
    chunk: int = 512
    prefill_reps: int = 3
    seed: int = 0


def policy_label(spec: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f"({params})" if params else "")


def run_sparse_bench(config: EngineConfig, spec: SparseBenchSpec) -> dict:
    if config.parallel.enabled:
        raise ValueError("bench sparse drives the model runner in this process; run it without afd")
    policies = [policy_spec(p) for p in spec.policies]
    if policies[0]["name"] != "dense":
        policies.insert(0, {"name": "dense"})  # the baseline of every delta, and the passkey prefix's first reader
    rows, prefill_rows = [], []
    with LLM(config=config) as llm:
        text_ids = llm.tokenizer.encode(english_text())
        for context in spec.contexts:
            if context > llm.engine.max_model_len or context > len(text_ids):
                raise ValueError(f"context {context} is over the model's {llm.engine.max_model_len} tokens or the "
                                 f"text's {len(text_ids)}")
            perplexities, prefill_s = decode_perplexities(llm, text_ids[:context], policies, spec)
            prefill_rows += prefill_costs(llm, text_ids[:context], policies, spec)
            llm.reset_prefix_cache()  # the scorer wrote KV blocks behind the prefix cache's back
            passkeys = passkey_accuracy(llm, context, policies, spec)
            for policy, (ppl, fraction, decode_ms, unread) in zip(policies, perplexities):
                rows.append(dict(context=context, policy=policy_label(policy), spec=policy, perplexity=ppl,
                                 delta_pct=100 * (ppl / perplexities[0][0] - 1), attended_fraction=fraction,
                                 unread_page_fraction=unread, decode_ms=decode_ms, prefill_s=prefill_s,
                                 passkey=passkeys[policy_label(policy)]))
    return dict(spec=dict(contexts=spec.contexts, scored_tokens=spec.scored_tokens, depths=spec.depths,
                          trials=spec.trials, chunk=spec.chunk, prefill_reps=spec.prefill_reps), rows=rows,
                prefill_rows=prefill_rows)


def decode_perplexities(llm: LLM, token_ids: list[int], policies: list[dict],
                        spec: SparseBenchSpec) -> tuple[list[tuple[float, float, float, float]], float]:
    """Per policy (perplexity over the scored decodes, attended fraction, median decode ms, fraction of pages that no
    layer or head read in a step); the prefill seconds."""
    runner = llm.engine.core.executor.runner
    block_size = llm.engine.config.cache.block_size
    blocks = list(range(-(-len(token_ids) // block_size)))
    if len(blocks) > llm.engine.num_kv_blocks:
        raise ValueError(f"{len(token_ids)} tokens need {len(blocks)} KV blocks; the pool has "
                         f"{llm.engine.num_kv_blocks} (raise --kv-cache-memory-gb)")
    prefix = len(token_ids) - spec.scored_tokens
    start = time.perf_counter()
    _run(runner, "prefill", token_ids, blocks, [(p, min(spec.chunk, prefix - p)) for p in range(0, prefix, spec.chunk)],
         {"name": "dense"})
    prefill_s = time.perf_counter() - start
    results = []
    for policy in policies:
        stats = runner.attention_policies.stats = AttendedTokens()
        logprobs, step_s = _run(runner, f"score-{policy_label(policy)}", token_ids, blocks,
                                [(p, 1) for p in range(prefix, len(token_ids) - 1)], policy)
        runner.attention_policies.stats = None
        ppl = math.exp(-sum(logprobs) / len(logprobs))
        unread = stats.unread_pages / stats.held_pages if stats.held_pages else 0.0
        results.append((ppl, stats.fraction, 1000 * statistics.median(step_s), unread))
    return results, prefill_s


def prefill_costs(llm: LLM, token_ids: list[int], policies: list[dict], spec: SparseBenchSpec) -> list[dict]:
    """Dense and each policy with a prefill of its own: `token_ids` as one prefill chunk (median seconds, perplexity
    of the last half), and one layer's prefill attention alone (median ms)."""
    runner = llm.engine.core.executor.runner
    blocks = list(range(-(-len(token_ids) // llm.engine.config.cache.block_size)))
    own = [p for p in policies if p["name"] == "dense" or getattr(runner.attention_policies.get(p), "has_prefill",
                                                                    False)]
    if len(own) < 2:  # dense alone: nothing to compare
        return []
    rows = []
    runs = tqdm(total=len(own) * spec.prefill_reps, leave=False, desc=f"bench sparse prefill {len(token_ids)}")
    for policy in own:
        label = policy_label(policy)
        seconds, logprobs = [], []
        for rep in range(spec.prefill_reps):
            begin = time.perf_counter()
            hidden = _prefill_once(runner, f"prefill-{label}-{rep}", token_ids, blocks, policy)
            seconds.append(time.perf_counter() - begin)
            runs.update()
        with torch.inference_mode():
            for first in range(len(token_ids) // 2, len(token_ids) - 1, 512):  # row p predicts token p + 1
                rows_of = range(first, min(first + 512, len(token_ids) - 1))
                logits = runner.model.compute_logits(hidden[rows_of.start:rows_of.stop]).float().log_softmax(-1)
                logprobs += logits[torch.arange(len(rows_of)), token_ids[rows_of.start + 1:rows_of.stop + 1]].tolist()
        rows.append(dict(context=len(token_ids), policy=label, spec=policy, prefill_s=statistics.median(seconds),
                         perplexity=math.exp(-sum(logprobs) / len(logprobs)),
                         attention_ms=1000 * _attention_seconds(runner, policy, len(token_ids))))
    runs.close()
    for row in rows:
        row["speedup"] = rows[0]["prefill_s"] / row["prefill_s"]
        row["attention_speedup"] = rows[0]["attention_ms"] / row["attention_ms"]
        row["delta_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return rows


def _attention_seconds(runner, policy: dict, context: int, reps: int = 3) -> float:
    """One layer's prefill attention over `context` tokens at the model's shape, random q/k/v: median seconds, as the
    torch backend runs it (policy None: dense)."""
    cfg = runner.model_config
    page = runner.block_size
    num_blocks = -(-context // page)
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(kv_cache_shape(num_blocks, page, cfg.num_kv_heads, cfg.head_dim), generator=generator)
    q = torch.randn(context, cfg.num_heads, cfg.head_dim, generator=generator).to(runner.dtype)
    seq = PrefillSeq(0, context, context, torch.arange(num_blocks), runner.attention_policies.get(policy))
    cache, scale = cache.to(runner.dtype), cfg.head_dim ** -0.5
    seconds = []
    for _ in range(reps):
        begin = time.perf_counter()
        with torch.inference_mode():
            if seq.policy is None:
                prefill_attention(q, cache, seq.block_ids, context, scale)
            else:
                policy_prefill(seq, q, cache, scale, layer=0)
        seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds)


def _forward(runner, item: ScheduledRequest) -> tuple[torch.Tensor, object]:
    """One scheduled chunk through the model, straight to the runner: (hidden states, the step's batch)."""
    with torch.inference_mode():
        runner.requests.update(SchedulerOutput([item]))
        batch = runner.build_batch([item])
        return runner.model(batch.input_ids, batch.positions, batch.meta, runner.kv_caches), batch


def _prefill_once(runner, request_id: str, token_ids: list[int], blocks: list[int], policy: dict) -> torch.Tensor:
    """token_ids as one request's single prefill chunk: the hidden states."""
    new = NewRequestData(request_id, token_ids, [], SamplingParams(temperature=0, attention_policy=policy), frozenset())
    hidden, _ = _forward(runner, ScheduledRequest(request_id, 0, len(token_ids), [], blocks, False, new=new))
    runner.requests.update(SchedulerOutput(finished_request_ids={request_id}))
    return hidden


def _run(runner, request_id: str, token_ids: list[int], blocks: list[int], chunks: list[tuple[int, int]],
         policy: dict) -> tuple[list[float], list[float]]:
    """Feeds `chunks` (start, tokens) of one request straight to the runner; returns the log-probability of the
    text token after each chunk and each step's seconds."""
    # The text after the first chunk's start is "output": a policy counts a request's decodes from there (SparseD).
    first = chunks[0][0] if chunks[0][1] == 1 else len(token_ids)
    new = NewRequestData(request_id, token_ids[:first], token_ids[first:],
                         SamplingParams(temperature=0, attention_policy=policy), frozenset())
    logprobs, seconds = [], []
    for i, (start, n) in enumerate(tqdm(chunks, desc=f"bench sparse {request_id}", leave=False)):
        begin = time.perf_counter()
        item = ScheduledRequest(request_id, start, n, [], blocks if i == 0 else [], False, new=new if i == 0 else None)
        hidden, batch = _forward(runner, item)
        with torch.inference_mode():
            logits = runner.model.compute_logits(hidden[-1:])
        seconds.append(time.perf_counter() - begin)
        stats, sparse = runner.attention_policies.stats, batch.meta.sparse
        if stats is not None and sparse is not None and sparse.groups:
            group = sparse.groups[0]
            stats.add_step(group.pages_read, group.decodes)
        logprobs.append(logits.float().log_softmax(-1)[0, token_ids[start + n]].item())
    runner.requests.update(SchedulerOutput(finished_request_ids={request_id}))
    return logprobs, seconds


def passkey_prompt(tokenizer, context: int, depth: float, key: int) -> str:
    """About `context` tokens of filler with the key stated at `depth` of it, then the question."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    room = context - len(tokenizer.encode(needle + QUESTION)) - 16
    repeats = max(1, room // len(tokenizer.encode(FILLER)))
    at = round(depth * repeats)
    return FILLER * at + needle + FILLER * (repeats - at) + QUESTION


def passkey_accuracy(llm: LLM, context: int, policies: list[dict], spec: SparseBenchSpec) -> dict:
    """{policy label: {depth: fraction of trials whose key came back}}."""
    rng = random.Random(spec.seed)
    hits = {policy_label(p): {depth: 0 for depth in spec.depths} for p in policies}
    trials = [(depth, rng.randrange(10000, 100000)) for depth in spec.depths for _ in range(spec.trials)]
    for depth, key in tqdm(trials, desc=f"bench sparse passkey {context}", leave=False):
        prompt = passkey_prompt(llm.tokenizer, context, depth, key)
        params = [SamplingParams(temperature=0, max_tokens=8, attention_policy=p) for p in policies]
        outs = llm.generate([prompt], params[:1], use_tqdm=False)  # dense first: its prefill is cached
        outs += llm.generate([prompt] * (len(policies) - 1), params[1:], use_tqdm=False)
        for policy, out in zip(policies, outs):
            hits[policy_label(policy)][depth] += str(key) in out.outputs[0].text
    return {label: {str(depth): n / spec.trials for depth, n in per_depth.items()} for label, per_depth in hits.items()}


def format_sparse_result(result: dict) -> str:
    depths = result["spec"]["depths"]
    header = (f"{'context':>7} {'policy':<44} {'perplexity':>10} {'delta':>8} {'attended':>8} {'unread':>7} "
              f"{'decode ms':>9} "
              + " ".join(f"{'key@' + str(d):>7}" for d in depths))
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['context']:>7} {r['policy']:<44} {r['perplexity']:>10.4f} {r['delta_pct']:>+7.2f}% "
                     f"{r['attended_fraction']:>8.3f} {r['unread_page_fraction']:>7.3f} {r['decode_ms']:>9.1f} "
                     + " ".join(f"{r['passkey'][str(d)]:>7.2f}" for d in depths))
    spec = result["spec"]
    prefills = sorted({(r["context"], r["prefill_s"]) for r in result["rows"]})
    lines.append(f"perplexity over {spec['scored_tokens']} teacher-forced decodes after the prefill (dense, chunks of "
                 f"{spec['chunk']}: " + ", ".join(f"{c} tokens {s:.1f} s" for c, s in prefills)
                 + f"); passkey: {spec['trials']} trials per depth")
    if result.get("prefill_rows"):
        header = (f"{'context':>7} {'prefill policy':<44} {'prefill s':>9} {'speedup':>7} {'attn ms':>8} "
                  f"{'speedup':>7} {'ppl 2nd half':>12} {'delta':>8}")
        lines += ["", header, "-" * len(header)]
        for r in result["prefill_rows"]:
            lines.append(f"{r['context']:>7} {r['policy']:<44} {r['prefill_s']:>9.2f} {r['speedup']:>6.2f}x "
                         f"{r['attention_ms']:>8.1f} {r['attention_speedup']:>6.2f}x {r['perplexity']:>12.4f} "
                         f"{r['delta_pct']:>+7.2f}%")
        lines.append(f"prefill: the context as one chunk, median of {spec['prefill_reps']} runs; attn ms: one layer's "
                     f"prefill attention alone (random inputs); perplexity of the context's last half from the "
                     f"prefill's logits")
    return "\n".join(lines)


def plot_sparse_result(result: dict, path) -> None:
    """Passkey accuracy (mean over depths) against attended fraction: a colour per policy, a marker per context."""
    from afdserve.bench.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    policies = list(dict.fromkeys(r["policy"] for r in result["rows"]))
    contexts = list(dict.fromkeys(r["context"] for r in result["rows"]))
    colours = plt.get_cmap("tab10")
    markers = "os^Dv*"
    for r in result["rows"]:
        ax.scatter(r["attended_fraction"], statistics.mean(r["passkey"].values()), s=40,
                   color=colours(policies.index(r["policy"]) % 10), marker=markers[contexts.index(r["context"]) % 6])
    for i, policy in enumerate(policies):
        ax.scatter([], [], color=colours(i % 10), marker="o", label=policy)
    for i, context in enumerate(contexts):
        ax.scatter([], [], color="grey", marker=markers[i % 6], label=f"{context} tokens")
    ax.set_xlabel("attended fraction of the KV tokens (decode)")
    ax.set_ylabel("passkey accuracy (mean over depths)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(plt, fig, path)
