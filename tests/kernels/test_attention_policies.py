"""Attention policies (kernels/attention/sparse): each against a plain-torch reference of its algorithm written here
from the papers' definitions, the sparse decode against a float64 softmax over exactly the kept tokens, and, through
the engine, every policy whose budget covers every page against transformers (the dense oracle).
The Triton kernel's per-head tables are tested in test_triton_attention.py."""
import math

import pytest
import torch

from afdserve.kernels.attention.sparse.delta import DeltaPolicy, default_full_layers
from afdserve.kernels.attention.sparse.policy import KVLayout
from afdserve.kernels.attention.sparse.prflash import PrFlashPolicy
from afdserve.kernels.attention.sparse.quest import QuestPolicy
from afdserve.kernels.attention.sparse.registry import make_policy
from afdserve.kernels.attention.sparse.selection import (DecodeBatch, PageSelection, compact, selected_blocks,
                                                         selected_mask_bias)
from afdserve.kernels.attention.torch_paged import decode_attention, kv_cache_shape, write_kv

PAGE = 4


def _batch(seq_lens, kv_heads=2, head_dim=8, seed=0, dtype=torch.float32):
    """A cache whose sequences own shuffled blocks, written through write_kv; the DecodeBatch over them; the keys and
    values per sequence as [kv_heads, len, hd] for the references."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // PAGE) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    cache = torch.zeros(kv_cache_shape(num_blocks, PAGE, kv_heads, head_dim), dtype=dtype)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.long)
    keys, values = [], []
    for s, n in enumerate(seq_lens):
        tables[s, :per_seq[s]] = torch.tensor([ids.pop() for _ in range(per_seq[s])])
        k, v = torch.randn(2, n, kv_heads, head_dim, generator=g).to(dtype)
        pos = torch.arange(n)
        write_kv(cache, k, v, tables[s, pos // PAGE] * PAGE + pos % PAGE)
        keys.append(k.transpose(0, 1))
        values.append(v.transpose(0, 1))
    decodes = DecodeBatch(tables, torch.tensor(seq_lens), PAGE, torch.zeros(len(seq_lens), dtype=torch.long))
    return cache, decodes, keys, values


def _bind(policy, cache, num_layers=1):
    """The policy bound to `cache` (every layer's), with a fresh state of its kind as a runner gives it."""
    _, kv_heads, num_blocks, page, head_dim = cache.shape
    layout = KVLayout(num_layers, num_blocks, page, kv_heads, head_dim, cache.dtype, torch.device("cpu"))
    policy.bind(layout, policy.state_type and policy.state_type(layout, [cache] * num_layers))
    return policy


# ---- the seam: kept pages -> what the decode reads ----------------------------------------------------------------

def _reference_sparse_decode(q, keys, values, kept_pages, log_weights, scale):
    """float64: each query head over the tokens of its KV head's kept pages, page log-weights added to the logits."""
    num_heads = q.shape[0]
    kv_heads, n, _ = keys.shape
    group = num_heads // kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(num_heads):
        kv = h // group
        tokens = [t for t in range(n) if t // PAGE in kept_pages[kv]]
        logits = keys[kv, tokens].double() @ q[h].double() * scale
        logits += torch.tensor([log_weights[kv][t // PAGE] for t in tokens], dtype=torch.float64)
        out[h] = logits.softmax(0) @ values[kv, tokens].double()
    return out


@pytest.mark.parametrize("weights", [False, True])
def test_sparse_decode_is_softmax_over_the_kept_tokens(weights):
    cache, decodes, keys, values = _batch([13, 4, 22, 9], seed=1)
    g = torch.Generator().manual_seed(2)
    num_seqs, max_pages = decodes.block_tables.shape
    kept = torch.rand(num_seqs, 2, max_pages, generator=g) < 0.5
    kept &= decodes.valid_pages()[:, None, :]
    kept |= (torch.arange(max_pages) == decodes.num_pages[:, None, None] - 1)  # the last page, always
    log_w = torch.randn(num_seqs, 2, max_pages, generator=g) if weights else None
    selection = compact(kept, log_w)
    blocks = selected_blocks(selection, decodes)
    q = torch.randn(num_seqs, 6, 8, generator=g)
    out = decode_attention(q, cache, blocks.block_tables, selected_mask_bias(blocks, PAGE), 0.3)
    for s in range(num_seqs):
        pages = [set(torch.nonzero(kept[s, h]).flatten().tolist()) for h in range(2)]
        weight = log_w[s].tolist() if weights else [[0.0] * max_pages] * 2
        ref = _reference_sparse_decode(q[s], keys[s], values[s], pages, weight, 0.3)
        torch.testing.assert_close(out[s].double(), ref, atol=1e-5, rtol=1e-5)


def test_compact_lists_kept_pages_ascending_with_counts():
    kept = torch.tensor([[[True, False, True, True], [False, False, False, True]]])
    pages, counts, _ = compact(kept)
    assert counts.tolist() == [[3, 1]]
    assert pages[0, 0].tolist() == [0, 2, 3]
    assert pages[0, 1, :1].tolist() == [3]


# ---- Quest ------------------------------------------------------------------------------------------------------

def _reference_quest_pages(q, keys, budget, kv_heads):
    """Per KV head: page criticality = sum_d max(q_d min_d, q_d max_d) from the page's actual keys (max over the
    group's query heads); the `budget` most critical pages plus the last, ascending."""
    num_heads, _ = q.shape
    n = keys.shape[1]
    num_pages = -(-n // PAGE)
    group = num_heads // kv_heads
    chosen = []
    for kv in range(kv_heads):
        crit = []
        for j in range(num_pages):
            page_keys = keys[kv, j * PAGE:min(n, (j + 1) * PAGE)]
            lo, hi = page_keys.amin(0), page_keys.amax(0)
            crit.append(max(torch.maximum(q[h] * lo, q[h] * hi).sum().item()
                            for h in range(kv * group, (kv + 1) * group)))
        crit[num_pages - 1] = math.inf
        chosen.append(sorted(sorted(range(num_pages), key=lambda j: -crit[j])[:budget]))
    return chosen


def test_quest_picks_the_pages_with_the_highest_key_bound():
    seq_lens = [23, 9, 30]
    cache, decodes, keys, _ = _batch(seq_lens, seed=3)
    # Bounds made from what the cache holds are replaced, block by block, when a block's first slot is written.
    policy = _bind(QuestPolicy(budget_pages=3, dense_layers=0), torch.randn(cache.shape))
    # The summaries come from on_write: replay each sequence's keys through it in chunks, as prefill + decodes do.
    for s, n in enumerate(seq_lens):
        for start, stop in ((0, n - 2), (n - 2, n - 1), (n - 1, n)):
            pos = torch.arange(start, stop)
            policy.bounds.on_write(0, keys[s][:, start:stop].transpose(0, 1),
                            decodes.block_tables[s, pos // PAGE] * PAGE + pos % PAGE)
    q = torch.randn(len(seq_lens), 6, 8, generator=torch.Generator().manual_seed(4))
    pages, counts, _ = policy.select(0, q, cache, decodes, 1.0)
    for s in range(len(seq_lens)):
        ref = _reference_quest_pages(q[s], keys[s], 3, 2)
        assert [pages[s, h, :counts[s, h]].tolist() for h in range(2)] == ref


def test_quest_bounds_start_afresh_when_a_block_is_reused():
    bounds = _bind(QuestPolicy(budget_pages=1, dense_layers=0), torch.zeros(kv_cache_shape(4, PAGE, 1, 2))).bounds
    block = 2
    bounds.on_write(0, torch.full((PAGE, 1, 2), 9.0), block * PAGE + torch.arange(PAGE))
    fresh = torch.tensor([[[1.0, -1.0]], [[2.0, -3.0]]])
    bounds.on_write(0, fresh, block * PAGE + torch.arange(2))  # freed and given to a new sequence
    assert bounds.key_max[0][0, block].tolist() == [2.0, -1.0]
    assert bounds.key_min[0][0, block].tolist() == [1.0, -3.0]


def test_quest_bounds_start_from_what_the_cache_holds():
    """A Quest state made mid-run (the first request naming quest) bounds the blocks written before it."""
    cache, decodes, keys, _ = _batch([10, 7], seed=9)
    bounds = _bind(QuestPolicy(), cache).bounds
    for s, n in enumerate([10, 7]):
        for j in range(-(-n // PAGE)):
            block = decodes.block_tables[s, j]
            page_keys = keys[s][:, j * PAGE:(j + 1) * PAGE]  # [kv_heads, tokens, hd]
            assert (bounds.key_max[0][:, block] >= page_keys.amax(1)).all()
            assert (bounds.key_min[0][:, block] <= page_keys.amin(1)).all()


def test_quest_leaves_its_first_layers_dense():
    cache, decodes, _, _ = _batch([12])
    policy = _bind(QuestPolicy(budget_pages=1, dense_layers=2), cache, num_layers=3)
    q = torch.randn(1, 6, 8)
    assert policy.select(1, q, cache, decodes, 1.0) is None
    assert policy.select(2, q, cache, decodes, 1.0) is not None


# ---- DELTA ------------------------------------------------------------------------------------------------------

def _reference_delta_pages(q, keys, budget, recent, scale):
    """DELTA from its definition: softmax over the whole cache per query head, token score = max over heads, page
    score = sum over the page's tokens, the last `recent` pages forced, ties to the older page; top `budget`,
    ascending."""
    num_heads = q.shape[0]
    kv_heads, n, _ = keys.shape
    group = num_heads // kv_heads
    probs = torch.stack([(keys[h // group].double() @ q[h].double() * scale).softmax(0) for h in range(num_heads)])
    token_score = probs.amax(0)
    num_pages = -(-n // PAGE)
    score = [token_score[j * PAGE:(j + 1) * PAGE].sum().item() for j in range(num_pages)]
    score = [math.inf if j >= num_pages - recent else score[j] - 1e-7 * j for j in range(num_pages)]
    return sorted(sorted(range(num_pages), key=lambda j: (-score[j], j))[:budget])


def test_delta_selection_layer_scores_pages_by_head_max_probability():
    seq_lens = [40, 17, 33]
    cache, decodes, keys, _ = _batch(seq_lens, seed=5)
    policy = _bind(DeltaPolicy(budget_pages=4, recent_pages=2, full_layers=(0, 1)), cache, num_layers=4)
    q = torch.randn(len(seq_lens), 6, 8, generator=torch.Generator().manual_seed(6)) * 3
    assert policy.select(0, q, cache, decodes, 0.35) is None  # a full layer before the selection layer
    assert policy.select(1, q, cache, decodes, 0.35) is None  # the selection (Δ) layer reads every page
    pages, counts, _ = policy.select(2, q, cache, decodes, 0.35)  # sparse: the Δ-layer's choice
    for s in range(len(seq_lens)):
        ref = _reference_delta_pages(q[s], keys[s], 4, 2, 0.35)
        for h in range(2):  # one list for every KV head
            assert pages[s, h, :counts[s, h]].tolist() == ref
    assert policy.select(3, torch.zeros_like(q), cache, decodes, 0.35) is not None  # reused, not recomputed
    assert torch.equal(policy.select(3, torch.zeros_like(q), cache, decodes, 0.35).pages, pages)


def test_delta_default_layers_scale_the_papers_28():
    assert default_full_layers(28) == (0, 1, 2, 14, 22)
    assert default_full_layers(30) == (0, 1, 2, 15, 24)


# ---- PrFlash ----------------------------------------------------------------------------------------------------

def test_prflash_probabilities_follow_the_harmonic_rule_with_the_budget_in_expectation():
    _, decodes, _, _ = _batch([100, 37, 8])
    policy = PrFlashPolicy(budget_pages=6, window_pages=2, keep_sink=True)
    policy.bind(KVLayout(1, 64, PAGE, 2, 8, torch.float32, torch.device("cpu")), None)
    p = policy.probabilities(decodes)
    for s, num_pages in enumerate(decodes.num_pages.tolist()):
        row = p[s, :num_pages]
        assert p[s, num_pages:].eq(0).all()
        if num_pages <= 6:
            assert row.eq(1).all()  # the budget covers every page
            continue
        assert row[0] == 1 and row[-2:].eq(1).all()  # sink and window
        assert row.sum().item() == pytest.approx(6.0, abs=1e-3)
        distance = num_pages - 1 - torch.arange(1, num_pages - 2)
        c = row[1:num_pages - 2] * (distance + 1)  # p = min(1, c / (d + 1)): one c for the unsaturated pages
        free = row[1:num_pages - 2] < 1
        assert torch.allclose(c[free], c[free][0].expand_as(c[free]), rtol=1e-4)


def test_prflash_draws_are_seeded_reproducible_and_at_the_rate():
    _, decodes, _, _ = _batch([80, 80])
    policy = PrFlashPolicy(budget_pages=5, window_pages=1, reweight=True)
    policy.bind(KVLayout(8, 64, PAGE, 2, 8, torch.float32, torch.device("cpu")), None)
    q = torch.zeros(2, 6, 8)
    p = policy.probabilities(decodes)[0]
    first = policy.select(3, q, None, decodes, 1.0)
    again = policy.select(3, q, None, DecodeBatch(decodes.block_tables, decodes.seq_lens, PAGE, decodes.seeds), 1.0)
    assert torch.equal(first.pages, again.pages) and torch.equal(first.counts, again.counts)
    # Alone in its batch, sequence 0 draws what it drew beside sequence 1.
    alone = DecodeBatch(decodes.block_tables[:1], decodes.seq_lens[:1], PAGE, decodes.seeds[:1])
    assert torch.equal(policy.select(3, q[:1], None, alone, 1.0).pages[0, :, :first.counts[0].max()],
                       first.pages[0, :, :first.counts[0].max()])
    # Reweighting: each kept page carries log(1 / p).
    for h in range(2):
        kept = first.pages[0, h, :first.counts[0, h]]
        assert torch.allclose(first.log_weights[0, h, :first.counts[0, h]], -p[kept].log())
    # Over many layers and seeds, each page is kept at its probability.
    hits, trials = torch.zeros_like(p), 0
    for seed in range(50):
        seeded = DecodeBatch(decodes.block_tables, decodes.seq_lens, PAGE, torch.full((2,), seed))
        for layer in range(8):
            sel = policy.select(layer, q, None, seeded, 1.0)
            for s in range(2):
                for h in range(2):
                    hits[sel.pages[s, h, :sel.counts[s, h]]] += 1
                    trials += 1
    rate = hits / trials
    assert rate[0] == 1 and rate[-1] == 1
    assert (rate - p).abs().max() < 4 * math.sqrt(0.25 / trials) + 0.01


# ---- the registry -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, message", [
    ("sparse", None, "unknown attention policy 'sparse'"),
    ("quest", {"budget": 3}, "has no parameter(s) budget; it takes: budget_pages, dense_layers"),
    ("quest", {"budget_pages": "3"}, "budget_pages must be int"),
    ("delta", '{"budget_pages": 4,', "not JSON"),
    ("delta", "[1]", "must be a JSON object"),
    ("delta", {"full_layers": [1, 2]}, "must include layer 0"),
    ("prflash", {"budget_pages": 0}, "budget_pages must be >= 1"),
])
def test_bad_policy_configs_name_what_is_wrong(name, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_policy(name, params)


def test_engine_config_refuses_policy_combinations_it_cannot_run():
    from afdserve.engine.config import engine_config
    with pytest.raises(ValueError, match="attention_policy is 'dense'"):
        engine_config(attention_policy_config={"budget_pages": 4})
    with pytest.raises(ValueError, match="staircase"):
        engine_config(attention_policy="quest", kv_cache_dtype="int4")


# ---- through the engine -----------------------------------------------------------------------------------------

COVERING = {  # each policy with a budget over every page of these prompts, sparse from layer 1 on
    "quest": {"budget_pages": 64, "dense_layers": 1},
    "delta": {"budget_pages": 64, "recent_pages": 2, "full_layers": [0]},
    "prflash": {"budget_pages": 64, "reweight": True},
    "hyperattention": {"block_tokens": 4096, "min_seq_len": 0},
    "sparsed": {"keep_fraction": 1.0, "skip_steps": 1, "refresh_steps": 3},
}


@pytest.mark.parametrize("policy", COVERING)
def test_a_policy_whose_budget_covers_every_page_is_dense_attention(tmp_path, policy):
    """Greedy tokens, logprobs and prompt logprobs against transformers (dense attention), with several sequences
    of different lengths decoding in one batch through 8-token pages."""
    from conftest import generate_and_compare, make_tiny_model
    from afdserve import LLM

    hf = make_tiny_model(tmp_path, "llama", num_hidden_layers=3)
    prompts = [list(range(3, 60)), [9, 4, 200, 31], list(range(100, 125))]
    with LLM(str(tmp_path), dtype="float32", block_size=8, attention_policy=policy,
             attention_policy_config=COVERING[policy]) as llm:
        assert llm.engine.core.executor.runner.default_policy["name"] == policy
        generate_and_compare(llm, hf, prompts, new_tokens=10, top=3)


SPARSE = {  # one or two pages of a 60-token prompt's eight, so that each policy reads less than dense
    "quest": {"name": "quest", "budget_pages": 2, "dense_layers": 1},
    "delta": {"name": "delta", "budget_pages": 2, "recent_pages": 1, "full_layers": [0]},
    "prflash": {"name": "prflash", "budget_pages": 2.5, "reweight": True},
    "hyperattention": {"name": "hyperattention", "block_tokens": 8, "sample_tokens": 8, "min_seq_len": 0},
    "sparsed": {"name": "sparsed", "keep_fraction": 0.2, "skip_steps": 1, "refresh_steps": 3},
}


def test_requests_with_different_policies_batch_together(tmp_path):
    """Each request's policy (SamplingParams.attention_policy) in one batch gives the tokens and logprobs that an
    engine running that policy for all its requests gives it alone; a request naming dense reads every page under
    an engine whose default is a sparse policy."""
    from conftest import make_tiny_model
    from afdserve import LLM, SamplingParams

    make_tiny_model(tmp_path, "llama", num_hidden_layers=3)
    prompt = list(range(3, 63))
    params = dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)

    def run(llm, policies):
        outs = llm.generate([prompt] * len(policies), [SamplingParams(**params, attention_policy=p)
                                                     for p in policies], use_tqdm=False)
        return [(o.outputs[0].token_ids, [{t: round(lp.logprob, 4) for t, lp in step.items()}
                                          for step in o.outputs[0].logprobs]) for o in outs]

    alone = {}
    for name, spec in [("dense", None), *SPARSE.items()]:
        args = {} if spec is None else dict(attention_policy=name, attention_policy_config={
            k: v for k, v in spec.items() if k != "name"})
        with LLM(str(tmp_path), dtype="float32", block_size=8, **args) as llm:
            (alone[name],) = run(llm, [None])
    assert len({str(v) for v in alone.values()}) > 1  # the budgets are small enough to change the output
    with LLM(str(tmp_path), dtype="float32", block_size=8, attention_policy="quest",
             attention_policy_config={"budget_pages": 1}) as llm:
        mixed = run(llm, [SPARSE["delta"], {"name": "dense"}, SPARSE["prflash"], SPARSE["hyperattention"],
                          SPARSE["sparsed"], SPARSE["quest"]])
    assert mixed == [alone[name] for name in ("delta", "dense", "prflash", "hyperattention", "sparsed", "quest")]


@pytest.mark.parametrize("spec, message", [
    ({"budget_pages": 2}, "attention_policy needs a \"name\""),
    ({"name": "delta", "full_layers": [0, 9]}, "full_layers \\[0, 9\\] name a layer"),
    ({"name": "prflash", "budget_pages": float("nan")}, "budget_pages must be a finite number"),
])
def test_a_bad_request_policy_is_refused_before_it_is_queued(tmp_path, spec, message):
    from conftest import make_tiny_model
    from afdserve import LLM, SamplingParams

    make_tiny_model(tmp_path, "llama")
    with LLM(str(tmp_path), dtype="float32") as llm:
        with pytest.raises(ValueError, match=message):
            llm.generate([[5, 6]], SamplingParams(max_tokens=2, attention_policy=spec), use_tqdm=False)
        assert llm.engine.core.kv.num_free_blocks == llm.engine.num_kv_blocks


def test_an_engine_policy_naming_layers_the_model_lacks_fails_at_start(tmp_path):
    from conftest import make_tiny_model
    from afdserve import LLM

    make_tiny_model(tmp_path, "llama")  # 2 layers
    with pytest.raises(ValueError, match="full_layers \\[0, 5\\] name a layer this model \\(of 2\\)"):
        LLM(str(tmp_path), dtype="float32", attention_policy="delta", attention_policy_config={"full_layers": [0, 5]})


# ---- HyperAttention ---------------------------------------------------------------------------------------------

def test_gray_ranks_put_one_bit_between_neighbours():
    from afdserve.kernels.attention.sparse.lsh import gray_ranks
    ranks = gray_ranks(7)
    pattern_at = torch.empty_like(ranks)
    pattern_at[ranks] = torch.arange(128)
    assert sorted(ranks.tolist()) == list(range(128))
    assert all(bin(int(a) ^ int(b)).count("1") == 1 for a, b in zip(pattern_at[:-1], pattern_at[1:]))


def test_hyperattention_reads_the_bucket_range_exactly_and_samples_the_rest():
    """Against the definition, per (sequence, KV head): key buckets from the LSH's sign bits, the smallest bucket
    radius around the mean query's bucket holding >= block_tokens keys, its pages (and the last) exact; of the other
    pages ceil(sample_tokens / page) drawn, each weighted log(rest / drawn); short sequences read every page."""
    from afdserve.kernels.attention.sparse.hyper import HyperAttentionPolicy
    seq_lens = [61, 9, 47]
    cache, decodes, keys, _ = _batch(seq_lens, seed=11)
    policy = _bind(HyperAttentionPolicy(block_tokens=10, sample_tokens=2 * PAGE, min_seq_len=12), cache)
    lsh = policy.buckets.lsh
    q = torch.randn(len(seq_lens), 6, 8, generator=torch.Generator().manual_seed(12))
    pages, counts, weights = policy.select(0, q, cache, decodes, 1.0)
    for s, n in enumerate(seq_lens):
        num_pages = -(-n // PAGE)
        for h in range(2):
            kept = pages[s, h, :counts[s, h]].tolist()
            w = dict(zip(kept, weights[s, h, :counts[s, h]].tolist()))
            if n <= 12:
                assert kept == list(range(num_pages)) and set(w.values()) == {0.0}
                continue
            bits = (keys[s][h].float() @ lsh.projections) > 0  # [n, r]
            key_bucket = [int(lsh.ranks[int(sum(int(b) << i for i, b in enumerate(row)))]) for row in bits]
            q_bits = (q[s, 3 * h:3 * h + 3].mean(0) @ lsh.projections) > 0
            q_bucket = int(lsh.ranks[int(sum(int(b) << i for i, b in enumerate(q_bits)))])
            distance = [abs(b - q_bucket) for b in key_bucket]
            radius = next(r for r in range(128) if sum(d <= r for d in distance) >= 10)
            exact = {t // PAGE for t in range(n) if distance[t] <= radius} | {num_pages - 1}
            rest = set(range(num_pages)) - exact
            drawn = [j for j in kept if j not in exact]
            assert exact <= set(kept) and set(drawn) <= rest
            assert len(drawn) == min(2, len(rest))
            assert all(w[j] == 0.0 for j in exact)
            assert all(abs(w[j] - math.log(len(rest) / len(drawn))) < 1e-6 for j in drawn)


def test_hyperattention_buckets_follow_writes():
    from afdserve.kernels.attention.sparse.hyper import HyperAttentionPolicy
    cache, decodes, keys, _ = _batch([20], seed=13)
    state = _bind(HyperAttentionPolicy(), cache).buckets
    new_keys = torch.randn(3, 2, 8)
    block = decodes.block_tables[0, 1]
    state.on_write(0, new_keys, torch.tensor([1, 2, 3]) + block * PAGE)
    assert torch.equal(state.buckets[0][:, block, 1:4], state.lsh(new_keys).transpose(0, 1))
    assert torch.equal(state.buckets[0][:, decodes.block_tables[0, 0]], state.lsh(keys[0][:, :PAGE]))


def test_hyperattention_prefills_long_prompts_approximately_and_reproducibly(tmp_path):
    """A 60-token prompt under min_seq_len 16: the causal recursion's first quarter (15 tokens) is exact, so its
    prompt logprobs are dense attention's; the rest are estimated (they differ), the same on every run (seeded)."""
    from conftest import make_tiny_model
    from afdserve import LLM, SamplingParams

    make_tiny_model(tmp_path, "llama", num_hidden_layers=3)
    prompt = list(range(3, 63))

    def prompt_logprobs(policy):
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, attention_policy=policy)
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        return [next(iter(step.values())).logprob for step in out.prompt_logprobs[1:]]  # position 0 has none

    hyper = {"name": "hyperattention", "block_tokens": 8, "sample_tokens": 8, "min_seq_len": 16}
    with LLM(str(tmp_path), dtype="float32", block_size=8, max_num_batched_tokens=64) as llm:
        dense, first, again = prompt_logprobs(None), prompt_logprobs(hyper), prompt_logprobs(hyper)
    assert first == again
    assert first[:14] == pytest.approx(dense[:14], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(first[14:], dense[14:])) > 1e-3


# ---- SparseD ----------------------------------------------------------------------------------------------------

def _reference_sparsed_choice(q, keys, seq_len, keep_fraction, scale, kv_heads=2):
    """Per KV head: page score = mean over the page's tokens of the max over the head's query heads of the full
    softmax probability; the int(pages * keep_fraction) + 1 best."""
    group = q.shape[0] // kv_heads
    num_pages = -(-seq_len // PAGE)
    chosen = []
    for kv in range(kv_heads):
        probs = torch.stack([(keys[kv, :seq_len].double() @ q[h].double() * scale).softmax(0)
                             for h in range(kv * group, (kv + 1) * group)]).amax(0)
        score = [probs[j * PAGE:(j + 1) * PAGE].mean().item() for j in range(num_pages)]
        chosen.append(set(sorted(range(num_pages), key=lambda j: -score[j])[:int(num_pages * keep_fraction) + 1]))
    return chosen


def test_sparsed_selects_per_head_after_the_skipped_steps_and_reuses_the_choice():
    from afdserve.kernels.attention.sparse.sparsed import SparseDPolicy
    cache, decodes, keys, _ = _batch([50], seed=14)
    policy = _bind(SparseDPolicy(keep_fraction=0.25, skip_steps=2, refresh_steps=3), cache)
    state = {}
    g = torch.Generator().manual_seed(15)

    def step(seq_len, decode_step):
        batch = DecodeBatch(decodes.block_tables, torch.tensor([seq_len]), PAGE, decodes.seeds,
                            decode_steps=[decode_step], request_states=[state])
        q = torch.randn(1, 6, 8, generator=g) * 3
        pages, counts, _ = policy.select(0, q, cache, batch, 0.4)
        return q, [set(pages[0, h, :counts[0, h]].tolist()) for h in range(2)]

    every = [set(range(-(-41 // PAGE)))] * 2
    assert step(41, 0)[1] == every  # skipped: every page
    q, pages = step(42, 2)  # the selection step reads every page, and chooses
    assert pages == [set(range(11))] * 2
    assert [set(c.tolist()) for c in state[("sparsed", 0)][0]] == _reference_sparsed_choice(q[0], keys[0], 42, 0.25,
                                                                                              0.4)
    chosen = _reference_sparsed_choice(q[0], keys[0], 42, 0.25, 0.4)
    _, pages = step(45, 3)  # reuse: the choice, the pages made since (11 and on), the sink and the last
    assert pages == [c | {0, 11} for c in chosen]
    q, _ = step(47, 5)  # two refreshes on: a new selection
    assert [set(c.tolist()) for c in state[("sparsed", 0)][0]] == _reference_sparsed_choice(q[0], keys[0], 47, 0.25,
                                                                                              0.4)
