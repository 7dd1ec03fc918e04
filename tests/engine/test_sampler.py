"""Sampler against plain float64 references written from the definitions (vLLM's), plus empirical checks."""
from __future__ import annotations

import math
import random

import pytest
import torch

from afdserve.engine.request import Request
from afdserve.engine.sampler import Sampler, apply_penalties, filter_logits
from afdserve.engine.sampling_params import SamplingParams

V = 64


def make_request(rid: str = "r", prompt=(1, 2, 3), outputs=(), eos=frozenset({0}), **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), eos, max_tokens=1000)
    for t in outputs:
        r.append_output_token(t)
    return r


def reference_distribution(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """Temperature, then top-k, top-p and min-p, each on the distribution the previous one left."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order[:top_k] if top_k else order)

    def probs():
        m = max(z[i] for i in keep)
        e = {i: math.exp(z[i] - m) for i in keep}
        total = sum(e.values())
        return {i: v / total for i, v in e.items()}

    if top_p < 1.0:
        p, mass, kept = probs(), 0.0, set()
        for i in (i for i in order if i in keep):
            if mass >= top_p:  # the smallest set of most likely tokens whose mass reaches top_p
                break
            kept.add(i)
            mass += p[i]
        keep = kept
    if min_p > 0:
        p = probs()
        top = max(p.values())
        keep = {i for i in keep if p[i] >= min_p * top}
    p = probs()
    return [p.get(i, 0.0) for i in range(len(z))]


def check_filter(logits: torch.Tensor, **params) -> None:
    got = filter_logits(logits.clone(), SamplingParams(**params)).softmax(-1).double()
    want = torch.tensor(reference_distribution(logits.double().tolist(), **params), dtype=torch.float64)
    assert torch.equal(got > 0, want > 0), f"kept sets differ for {params}"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def random_logits(seed: int, n: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3


def safe_top_p(logits: torch.Tensor, top_p: float, temperature: float = 1.0, top_k: int = 0) -> float:
    """Nudges top_p away from any cumulative mass, where float32 and float64 could round differently."""
    if top_p == 1.0:
        return top_p
    probs = torch.tensor(reference_distribution(logits.double().tolist(), temperature, top_k), dtype=torch.float64)
    cum = probs.sort(descending=True).values.cumsum(-1)
    while (cum - top_p).abs().min() < 1e-4:
        top_p -= 3e-4
    return top_p


# ---- filter_logits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_top_k(seed):
    logits = random_logits(seed)
    for k in (1, 2, 7, V - 1, V, V + 5):
        check_filter(logits, top_k=k)
        assert int((filter_logits(logits, SamplingParams(top_k=k)) > float("-inf")).sum()) == min(k, V)


@pytest.mark.parametrize("seed", range(5))
def test_top_p(seed):
    logits = random_logits(seed)
    rng = random.Random(seed)
    for top_p in [0.05, 0.5, 0.9, 0.99] + [rng.uniform(0.01, 1.0) for _ in range(8)]:
        check_filter(logits, top_p=safe_top_p(logits, top_p))


def test_top_p_keeps_the_boundary_token():
    logits = random_logits(11)
    cum = logits.double().softmax(-1).sort(descending=True).values.cumsum(-1)
    for k in (0, 1, 4, 10):
        # Mass reached exactly at token k (just below it): tokens 0..k are kept, token k included.
        kept = filter_logits(logits, SamplingParams(top_p=float(cum[k]) - 1e-4)) > float("-inf")
        assert int(kept.sum()) == k + 1
        # Mass just above cum[k]: token k + 1 is needed too.
        kept = filter_logits(logits, SamplingParams(top_p=float(cum[k]) + 1e-4)) > float("-inf")
        assert int(kept.sum()) == k + 2
    # A token with more than top_p of the mass on its own is kept alone.
    assert int((filter_logits(torch.tensor([5.0, 0.0, 0.0]), SamplingParams(top_p=0.5)) > -1e30).sum()) == 1


@pytest.mark.parametrize("seed", range(5))
def test_min_p(seed):
    logits = random_logits(seed)
    for min_p in (0.0, 0.01, 0.1, 0.37, 0.9, 1.0):
        check_filter(logits, min_p=min_p)


def test_min_p_threshold_is_relative_to_the_top_probability():
    # probs 0.5, 0.25, 0.125, 0.125: min_p 0.3 keeps p >= 0.15.
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    kept = filter_logits(logits, SamplingParams(min_p=0.3)) > float("-inf")
    assert kept.tolist() == [True, True, False, False]


@pytest.mark.parametrize("seed", range(6))
def test_temperature_and_combinations(seed):
    rng = random.Random(seed)
    logits = random_logits(100 + seed)
    for _ in range(10):
        temperature, top_k = rng.choice([0.3, 0.7, 1.0, 1.8]), rng.choice([0, 3, 10, 40])
        top_p = safe_top_p(logits, rng.choice([1.0, rng.uniform(0.1, 0.99)]), temperature, top_k)
        params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=rng.choice([0.0, rng.uniform(0, 0.5)]))
        check_filter(logits, **params)


# ---- penalties ----------------------------------------------------------------------------------------------

def reference_penalties(logits: list[float], prompt: list[int], output: list[int], rep: float, freq: float,
                        pres: float) -> list[float]:
    out = []
    for t, x in enumerate(logits):
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        count = output.count(t)
        out.append(x - freq * count - pres * (count > 0))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_penalties(seed):
    rng = random.Random(seed)
    logits = random_logits(200 + seed, 16)
    prompt = [rng.randrange(16) for _ in range(rng.randrange(1, 8))]
    output = [rng.randrange(16) for _ in range(rng.randrange(0, 10))]
    rep, freq, pres = rng.choice([1.0, 0.8, 1.3, 2.0]), rng.uniform(-2, 2), rng.uniform(-2, 2)
    params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    got = apply_penalties(logits.clone(), params, prompt, output)
    want = reference_penalties(logits.tolist(), prompt, output, rep, freq, pres)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_repetition_penalty_by_hand():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.0])
    got = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0, 1], [0, 4])
    assert got.tolist() == [1.0, -4.0, 1.0, -1.0, 0.0]
    got = apply_penalties(logits.clone(), SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [0, 1],
                          [2, 2, 3])
    assert got.tolist() == [2.0, -2.0, 1.0 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 0.0]


# ---- Sampler ------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_penalties_apply():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 1.0, 0.0, 0.0]])
    plain = make_request("a", temperature=0)
    penalized = make_request("b", prompt=[0], temperature=0, repetition_penalty=10.0)
    tokens, _ = Sampler()(logits, [plain, penalized], [None, None])
    assert tokens == [1, 1]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 8.0, 7.0, 0.0]] * 2)
    banned = make_request("a", temperature=0, min_tokens=2, stop_token_ids=[1])
    done = make_request("b", outputs=[3, 3], temperature=0, min_tokens=2, stop_token_ids=[1])
    assert Sampler()(logits, [banned, done], [None, None])[0] == [2, 0]
    ignore = make_request("c", temperature=0, min_tokens=1, ignore_eos=True)
    assert Sampler()(logits[:1], [ignore], [None])[0] == [0]
    g = torch.Generator().manual_seed(0)
    hot = make_request("d", temperature=5.0, min_tokens=3, stop_token_ids=[1])
    for _ in range(50):
        assert Sampler()(logits[:1], [hot], [g])[0][0] not in (0, 1)


def test_seeded_request_independent_of_batch():
    logits_rng = torch.Generator().manual_seed(5)
    steps = [torch.randn(6, V, generator=logits_rng) for _ in range(15)]
    params = dict(temperature=0.9, top_p=0.95, top_k=30)

    def sample_alone() -> list[int]:
        r, gen = make_request("s", seed=7, **params), torch.Generator().manual_seed(7)
        return [Sampler()(step[2:3], [r], [gen])[0][0] for step in steps]

    def sample_in_batch(position: int) -> list[int]:
        others = [make_request("o1", seed=1, **params), make_request("o2", **params),
                  make_request("o3", temperature=0), make_request("o4", temperature=1.5, min_p=0.05),
                  make_request("o5", seed=3, temperature=1.2)]
        gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(99), None, None,
                torch.Generator().manual_seed(3)]
        requests = others[:position] + [make_request("s", seed=7, **params)] + others[position:]
        gens = gens[:position] + [torch.Generator().manual_seed(7)] + gens[position:]
        out = []
        for step in steps:
            rows = torch.cat([step[[j for j in range(6) if j != 2][:position]], step[2:3],
                              step[[j for j in range(6) if j != 2][position:]]])
            out.append(Sampler()(rows, requests, gens)[0][position])
        return out

    alone = sample_alone()
    assert sample_in_batch(0) == alone and sample_in_batch(3) == alone and sample_in_batch(5) == alone
    assert len(set(alone)) > 3, "the seeded request should really be sampling"


def test_different_seeds_differ():
    logits = torch.zeros(1, V)
    runs = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        runs.append([Sampler()(logits, [make_request(seed=seed)], [gen])[0][0] for _ in range(20)])
    assert runs[0] != runs[1]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.6, top_k=4),
                                    dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.2)])
def test_sampling_follows_the_filtered_distribution(params):
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0, 0.0])
    n = 20000
    expected = reference_distribution(logits.tolist(), **params)
    gen = torch.Generator().manual_seed(1234)
    requests = [make_request(str(i), **params) for i in range(n)]
    tokens, _ = Sampler()(logits.expand(n, -1).contiguous(), requests, [gen] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double() / n
    for p, f in zip(expected, counts.tolist()):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (expected, counts.tolist())


def test_logit_bias_forces_bans_and_reweights():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    assert Sampler()(logits, [make_request(temperature=0, logit_bias={3: 100})], [None])[0] == [3]
    assert Sampler()(logits, [make_request(temperature=0, logit_bias={1: -100})], [None])[0] == [2]
    # Sampling follows softmax((logits + bias) / T), the bias added before temperature as in vLLM / OpenAI.
    base, bias, temperature, n = [1.0, 0.2, -0.5, 0.7], {0: -1.5, 2: 2.0}, 0.8, 20000
    expected = reference_distribution([x + bias.get(i, 0.0) for i, x in enumerate(base)], temperature)
    requests = [make_request(str(i), temperature=temperature, logit_bias=bias) for i in range(n)]
    tokens, _ = Sampler()(torch.tensor([base]).expand(n, -1).contiguous(), requests,
                          [torch.Generator().manual_seed(5)] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(base)).double() / n
    for p, f in zip(expected, counts.tolist()):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (expected, counts.tolist())


@pytest.mark.parametrize("bias, message", [({"3": 1.0}, "keys must be token ids"), ({-1: 1.0}, "keys"),
                                           ({True: 1.0}, "keys"), ({3: 101}, "values must be numbers in .-100, 100."),
                                           ({3: float("nan")}, "values"), ({3: "up"}, "values")])
def test_logit_bias_validation(bias, message):
    with pytest.raises(ValueError, match=f"logit_bias {message}"):
        SamplingParams(logit_bias=bias)


def test_logprobs_are_raw_with_ranks():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0]])
    r = make_request(temperature=0.5, top_k=1, logprobs=2)
    tokens, logprobs = Sampler()(logits, [r], [torch.Generator().manual_seed(0)])
    raw = [x - math.log(sum(math.exp(y) for y in logits[0].tolist())) for x in logits[0].tolist()]
    assert tokens == [2]
    lp = logprobs[0]
    assert lp.token_ids == [2, 2, 0] and lp.ranks == [1, 1, 2]
    assert lp.logprobs == pytest.approx([raw[2], raw[2], raw[0]], abs=1e-6)
    r2 = make_request(temperature=0, repetition_penalty=100.0, prompt=[2], logprobs=0)
    tokens, logprobs = Sampler()(logits, [r2], [None])
    assert tokens == [0] and logprobs[0].token_ids == [0] and logprobs[0].ranks == [2]
    assert logprobs[0].logprobs == pytest.approx([raw[0]], abs=1e-6)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_sampling_params_refuse_non_finite_floats_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
        SamplingParams(**{field: value})
