"""The whole engine on a tiny random Llama, with independent oracles: transformers' greedy tokens and logprobs, or
the engine itself under a configuration known to be good (a large KV pool, prefix caching off, a request alone).

Covers preemption (recompute), chunked prefill, prefix caching, n > 1 with seeds, stop conditions and logprobs.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import hf_greedy, make_tiny_model
from afdserve import LLM, SamplingParams

BIG_POOL = 256  # blocks of 16 tokens: far more than any test here needs, so nothing is ever preempted


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = random_prompt(13, seed=100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, make_tiny_model(directory, "llama")


def make_llm(tiny, **engine_args) -> LLM:
    engine_args.setdefault("num_kv_blocks", BIG_POOL)
    return LLM(str(tiny[0]), dtype="float32", **engine_args)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def generate(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def record_grants(llm: LLM, monkeypatch) -> list[list[tuple[str, int, int]]]:
    """Records each step's grants as (request id, start position, number of tokens)."""
    scheduler = llm.engine.core.scheduler
    schedule = scheduler.schedule
    steps = []

    def recording_schedule():
        out = schedule()
        steps.append([(s.request_id, s.start_pos, s.num_tokens) for s in out.scheduled])
        return out

    monkeypatch.setattr(scheduler, "schedule", recording_schedule)
    return steps


def prompt_chunks(steps, request_id: str, prompt_len: int) -> list[tuple[int, int]]:
    return [(start, n) for step in steps for rid, start, n in step if rid == request_id and start < prompt_len]


def assert_pool_full(llm: LLM) -> None:
    assert not llm.engine.has_unfinished()
    assert llm.engine.core.kv.num_free_blocks == llm.engine.num_kv_blocks


# ---- preemption ---------------------------------------------------------------------------------------------
PREEMPT_LENGTHS = [2, 9, 17, 24, 33, 41, 50, 61]
PREEMPT_PROMPTS = [random_prompt(n, seed=n) for n in PREEMPT_LENGTHS]
PREEMPT_PROMPTS[3][:16] = PREEMPT_PROMPTS[5][:16]  # a shared prefix, for the prefix cache to find
PREEMPT_PARAMS = [greedy(20 - i) for i in range(len(PREEMPT_PROMPTS))]
PREEMPT_PARAMS[2] = SamplingParams(temperature=0.9, seed=3, max_tokens=18, ignore_eos=True)  # seeded sampling
PREEMPT_PARAMS[5] = greedy(15, logprobs=2, prompt_logprobs=1)  # preempted in every configuration below


@pytest.fixture(scope="module")
def preempt_reference(tiny):
    """The requests' outputs with a pool that never preempts, and transformers' greedy tokens."""
    outs = generate(make_llm(tiny), PREEMPT_PROMPTS, PREEMPT_PARAMS)
    hf = [hf_greedy(tiny[1], prompt, params.max_tokens) if params.greedy else None
          for prompt, params in zip(PREEMPT_PROMPTS, PREEMPT_PARAMS)]
    return outs, hf


# A token budget of 16 makes prefills chunked, so requests are also preempted part way through their prompt.
@pytest.mark.parametrize("prefix_caching, budget", [(True, 2048), (False, 2048), (True, 16)])
def test_preemption_keeps_every_output(tiny, preempt_reference, monkeypatch, prefix_caching, budget):
    # 12 blocks of 8 tokens hold the longest request (61 + 14 tokens) but nowhere near all eight at once.
    llm = make_llm(tiny, num_kv_blocks=12, block_size=8, enable_prefix_caching=prefix_caching,
                   max_num_batched_tokens=budget)
    steps = record_grants(llm, monkeypatch)
    outs = generate(llm, PREEMPT_PROMPTS, PREEMPT_PARAMS)
    assert llm.engine.core.scheduler.num_preemptions > 0
    ref_outs, hf = preempt_reference
    for params, out, ref, hf_tokens in zip(PREEMPT_PARAMS, outs, ref_outs, hf):
        got, want = out.outputs[0], ref.outputs[0]
        assert got.token_ids == want.token_ids
        assert got.finish_reason == "length" and len(got.token_ids) == params.max_tokens
        if hf_tokens is not None:
            assert got.token_ids == hf_tokens
    # The logprobs of a recomputed request are neither lost nor repeated.
    lp_out, lp_ref = outs[5], ref_outs[5]
    assert sum(start == 0 for start, _ in prompt_chunks(steps, lp_out.request_id, 41)) > 1  # it was recomputed
    assert len(lp_out.outputs[0].logprobs) == len(lp_out.outputs[0].token_ids)
    assert len(lp_out.prompt_logprobs) == len(PREEMPT_PROMPTS[5])
    assert _logprob_values(lp_out.prompt_logprobs[1:]) == pytest.approx(_logprob_values(lp_ref.prompt_logprobs[1:]),
                                                                        abs=1e-5)
    assert _logprob_values(lp_out.outputs[0].logprobs) == pytest.approx(_logprob_values(lp_ref.outputs[0].logprobs),
                                                                        abs=1e-5)
    assert_pool_full(llm)


def _logprob_values(positions) -> list[float]:
    return [lp.logprob for position in positions for lp in position.values()]


# ---- chunked prefill ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [32, 7])
def test_chunked_prefill_matches_transformers(tiny, monkeypatch, budget):
    long_prompt, short_prompt = random_prompt(100, seed=1), random_prompt(5, seed=2)
    llm = make_llm(tiny, max_num_batched_tokens=budget)
    steps = record_grants(llm, monkeypatch)
    long_out, short_out = generate(llm, [long_prompt, short_prompt], [greedy(12, prompt_logprobs=2), greedy(12)])

    assert long_out.outputs[0].token_ids == hf_greedy(tiny[1], long_prompt, 12)
    assert short_out.outputs[0].token_ids == hf_greedy(tiny[1], short_prompt, 12)
    assert all(sum(n for _, _, n in step) <= budget for step in steps)
    chunks = prompt_chunks(steps, long_out.request_id, len(long_prompt))
    assert len(chunks) >= -(-len(long_prompt) // budget) > 1
    assert [start for start, _ in chunks] == [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
    assert sum(n for _, n in chunks) == len(long_prompt)
    # Prompt logprobs across chunk boundaries: position p's entry comes from the logits at p - 1.
    with torch.no_grad():
        ref = tiny[1](torch.tensor([long_prompt])).logits[0].log_softmax(-1)
    assert long_out.prompt_logprobs[0] is None and len(long_out.prompt_logprobs) == len(long_prompt)
    for p in range(1, len(long_prompt)):
        token = long_prompt[p]
        assert long_out.prompt_logprobs[p][token].logprob == pytest.approx(ref[p - 1, token].item(), abs=1e-4)
    assert_pool_full(llm)


# ---- prefix caching -----------------------------------------------------------------------------------------
def test_prefix_cache_hit_skips_prefill_and_keeps_output(tiny, monkeypatch):
    shared = random_prompt(64, seed=3)  # four full blocks of 16
    first_prompt, second_prompt = shared + random_prompt(10, seed=4), shared + random_prompt(12, seed=5)
    llm = make_llm(tiny)
    steps = record_grants(llm, monkeypatch)
    kv = llm.engine.core.kv
    first = generate(llm, [first_prompt], greedy(12))[0]
    hits_before = kv.prefix_hits
    second = generate(llm, [second_prompt], greedy(12))[0]

    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == len(shared)
    assert kv.prefix_hits - hits_before == len(shared)
    assert sum(n for _, n in prompt_chunks(steps, second.request_id, len(second_prompt))) == len(second_prompt) - 64

    uncached = make_llm(tiny, enable_prefix_caching=False)
    ref_first, ref_second = generate(uncached, [first_prompt, second_prompt], greedy(12))
    assert uncached.engine.core.kv.prefix_hits == 0 and ref_second.num_cached_tokens == 0
    assert first.outputs[0].token_ids == ref_first.outputs[0].token_ids
    assert second.outputs[0].token_ids == ref_second.outputs[0].token_ids == hf_greedy(tiny[1], second_prompt, 12)
    assert_pool_full(llm)


def test_prefix_cache_whole_prompt_and_same_batch_hits(tiny):
    block_aligned, shared = random_prompt(64, seed=6), random_prompt(40, seed=9)
    sharers = [shared + random_prompt(9, seed=7), shared + random_prompt(30, seed=8)]
    llm = make_llm(tiny)
    alone = generate(llm, [block_aligned], greedy(10))[0]
    # The same prompt again: all but the last block is reused (one token must be computed to sample from).
    again = generate(llm, [block_aligned], greedy(10))[0]
    assert again.num_cached_tokens == 48
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids == hf_greedy(tiny[1], block_aligned, 10)
    # Requests admitted in the same step share blocks that step is still writing.
    outs = generate(llm, sharers, greedy(10))
    assert [out.num_cached_tokens for out in outs] == [0, 32]
    for prompt, out in zip(sharers, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny[1], prompt, 10)
    assert_pool_full(llm)


# ---- n > 1 and seeds ----------------------------------------------------------------------------------------
def test_n_seeded_children_reproduce_and_follow_seed_plus_index(tiny):
    llm = make_llm(tiny)
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)
    first = generate(llm, [PROMPT], params)[0]
    again = generate(llm, [PROMPT], params)[0]

    children = [c.token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert all(len(t) == 12 and c.finish_reason == "length" for t, c in zip(children, first.outputs))
    assert [c.token_ids for c in again.outputs] == children
    assert len({tuple(t) for t in children}) == 3  # near-uniform random model: different seeds, different samples
    for i, tokens in enumerate(children):
        single = SamplingParams(temperature=0.8, seed=7 + i, max_tokens=12, ignore_eos=True)
        assert generate(llm, [PROMPT], single)[0].outputs[0].token_ids == tokens
    assert_pool_full(llm)


def test_greedy_n2_gives_identical_completions(tiny):
    llm = make_llm(tiny)
    out = generate(llm, [PROMPT], greedy(10, n=2))[0]
    assert len(out.outputs) == 2
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == hf_greedy(tiny[1], PROMPT, 10)
    assert out.outputs[0].text == out.outputs[1].text
    assert_pool_full(llm)


# ---- stop conditions ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def free_run(tiny):
    """PROMPT's greedy completion without stops, and a token j whose first appearance is at j (j >= 3)."""
    llm = make_llm(tiny)
    full = generate(llm, [PROMPT], greedy(24))[0].outputs[0]
    j = next(j for j, t in enumerate(full.token_ids) if j >= 3 and full.token_ids.index(t) == j)
    return llm, full, j


def test_max_tokens_finishes_with_length(free_run):
    llm, full, _ = free_run
    assert full.finish_reason == "length" and full.stop_reason is None and len(full.token_ids) == 24
    out = generate(llm, [PROMPT], greedy(5))[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == full.token_ids[:5]


def test_stop_string_spanning_tokens_is_cut_from_text(free_run):
    llm, full, j = free_run
    token_text = llm.tokenizer.decode([full.token_ids[j]])
    at = full.text.index(token_text)
    stop = full.text[at - 2:at + 3]  # the end of token j-1, then the start of token j
    assert full.text.index(stop) == at - 2
    out = generate(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    got = out[0].outputs[0]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert got.text == full.text[:at - 2] and stop not in got.text
    assert got.token_ids == full.token_ids[:j + 1]
    assert_pool_full(llm)


def test_stop_token_id_finishes_with_stop(free_run):
    llm, full, j = free_run
    stop_token = full.token_ids[j]
    got = generate(llm, [PROMPT], greedy(24, stop_token_ids=[stop_token]))[0].outputs[0]
    assert got.finish_reason == "stop" and got.stop_reason == stop_token
    assert got.token_ids == full.token_ids[:j + 1]
    # Before min_tokens the stop token cannot even be sampled.
    later = generate(llm, [PROMPT], greedy(24, stop_token_ids=[stop_token], min_tokens=j + 2))[0].outputs[0]
    assert later.token_ids[:j] == full.token_ids[:j]
    assert stop_token not in later.token_ids[:-1] and len(later.token_ids) >= j + 2
    assert later.finish_reason == ("stop" if later.token_ids[-1] == stop_token else "length")
    assert_pool_full(llm)


def test_eos_finishes_with_stop_unless_ignored(tiny, free_run, tmp_path):
    _, full, j = free_run
    eos = full.token_ids[j]
    shutil.copytree(tiny[0], tmp_path, dirs_exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((tmp_path / name).read_text())
        cfg["eos_token_id"] = eos
        (tmp_path / name).write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=BIG_POOL)
    got = generate(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert got.finish_reason == "stop" and got.stop_reason is None
    assert got.token_ids == full.token_ids[:j + 1]
    assert generate(llm, [PROMPT], greedy(24))[0].outputs[0].token_ids == full.token_ids


# ---- logprobs -----------------------------------------------------------------------------------------------
def test_logprobs_of_sampled_tokens_match_transformers(tiny):
    llm = make_llm(tiny)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = generate(llm, [PROMPT], params)[0]
    completion = out.outputs[0]
    tokens = completion.token_ids
    with torch.no_grad():
        ref = tiny[1](torch.tensor([PROMPT + tokens])).logits[0].log_softmax(-1)

    assert len(completion.logprobs) == len(tokens)
    for j, (token, position) in enumerate(zip(tokens, completion.logprobs)):
        _assert_position(position, token, ref[len(PROMPT) - 1 + j], k=3)
    assert completion.cumulative_logprob == pytest.approx(
        sum(ref[len(PROMPT) - 1 + j, t].item() for j, t in enumerate(tokens)), abs=1e-3)

    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        _assert_position(out.prompt_logprobs[p], PROMPT[p], ref[p - 1], k=2)
    # Asking again (the prompt is cached now) still gives every prompt position, unchanged.
    again = generate(llm, [PROMPT], params)[0]
    assert _logprob_values(again.prompt_logprobs[1:]) == _logprob_values(out.prompt_logprobs[1:])

    only_sampled = generate(llm, [PROMPT], greedy(4, logprobs=0))[0].outputs[0]
    assert [list(position) for position in only_sampled.logprobs] == [[t] for t in only_sampled.token_ids]


def _assert_position(position, token: int, ref_row: torch.Tensor, k: int) -> None:
    assert len(position) in (k, k + 1) and token in position
    assert position[token].logprob == pytest.approx(ref_row[token].item(), abs=1e-4)
    assert position[token].rank == int((ref_row > ref_row[token]).sum()) + 1
    assert set(ref_row.topk(k).indices.tolist()) <= set(position)
    for token_id, lp in position.items():
        assert lp.logprob == pytest.approx(ref_row[token_id].item(), abs=1e-4)
