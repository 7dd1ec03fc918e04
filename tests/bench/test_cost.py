"""`afdserve bench cost` (bench/cost.py) against hand-derived cases of Step-3's cost formulas (arXiv 2507.19427,
§4-§5): per-token KV bytes and FLOPs written out from the model shapes, unit costs from the card's price, peak and
bandwidth, and the AFD / sparsity / FFN-batch rules. Every expected number is computed here from the formula."""
import json

import pytest

from afdserve.bench.cost import CATALOG, CostSpec, model_from_hf_config, run_cost


def usd(per_hour, peak=None, bw=None):
    return per_hour / (3600 * (peak or bw))


def test_qwen3_32b_at_8k_on_h800_by_hand():
    result = run_cost(CostSpec(models=("Qwen3-32B",), contexts=(8192,)))
    row = result["rows"][0]
    layers, q, kv, d, hidden = 64, 64, 8, 128, 5120
    kv_bytes = layers * 2 * kv * d * 1 * 8192  # FP8 KV
    attn = layers * 4 * q * d * 8192
    linear = 2 * layers * (hidden * q * d + 2 * hidden * kv * d + q * d * hidden)
    ffn = 2 * layers * 3 * hidden * 25600
    assert (row["kv_bytes_per_token"], row["attn_flops_per_token"]) == (kv_bytes, attn)
    assert (row["linear_flops_per_token"], row["ffn_flops_per_token"]) == (linear, ffn)
    u_flop, u_byte = usd(2.0, peak=1.98e15), usd(2.0, bw=3.35e12)  # H800: FP8 peak
    assert row["usd_per_1m_attention"]["H800"] == pytest.approx(
        1e6 * (max(attn * u_flop, kv_bytes * u_byte) + linear * u_flop))
    assert row["usd_per_1m_ffn"]["H800"] == pytest.approx(1e6 * ffn * u_flop)
    u_flop_a800 = usd(0.75, peak=3.12e14)  # A800 has no FP8: its BF16 peak
    assert row["usd_per_1m_ffn"]["A800"] == pytest.approx(1e6 * ffn * u_flop_a800)
    # AFD: each part on its cheapest card.
    assert row["usd_per_1m_afd_best"] == pytest.approx(min(row["usd_per_1m_attention"].values()) +
                                                       min(row["usd_per_1m_ffn"].values()))
    assert set(row["usd_per_1m_attention"]) == {"H800", "H20", "A800", "910B"}  # unpriced cards are left out


def test_mla_and_hybrid_kv_bytes_by_hand():
    rows = {(r["model"], r["context"]): r for r in run_cost(CostSpec(
        models=("DeepSeek-V3", "Llama-4-Maverick", "Step-3"), contexts=(4096, 32768)))["rows"]}
    # MLA: the 512 latent + 64 rope values once per token, for both QK and PV in the FLOPs.
    assert rows["DeepSeek-V3", 32768]["kv_bytes_per_token"] == 61 * 576 * 32768
    assert rows["DeepSeek-V3", 32768]["attn_flops_per_token"] == 61 * 4 * 128 * 576 * 32768
    # Llama 4: 12 full layers with BF16 KV, 36 chunked FP8 layers that see at most 8192 tokens.
    assert rows["Llama-4-Maverick", 32768]["kv_bytes_per_token"] == 12 * 2 * 8 * 128 * 2 * 32768 + \
        36 * 2 * 8 * 128 * 8192
    assert rows["Llama-4-Maverick", 4096]["kv_bytes_per_token"] == 12 * 2 * 8 * 128 * 2 * 4096 + \
        36 * 2 * 8 * 128 * 4096
    # Step-3's MFA: one 256-wide KV head (512 bytes per token per layer at 8 bits), 64 query heads.
    assert rows["Step-3", 4096]["kv_bytes_per_token"] == 61 * 512 * 4096
    step3_linear = 7168 * 2560 + 2048 * 16384 + 16384 * 7168  # qkv_proj, wq, o_proj
    assert rows["Step-3", 4096]["linear_flops_per_token"] == 2 * 61 * step3_linear
    assert rows["Step-3", 4096]["ffn_flops_per_token"] == 2 * (56 * 4 * 3 * 7168 * 5120 + 5 * 3 * 7168 * 18432)


def test_sparsity_bound_and_ffn_batch_for_step3_by_hand():
    result = run_cost(CostSpec(models=("Step-3",), contexts=(8192,)))
    s = 4 / 49  # 3 routed of 48 + 1 shared
    peak, bw, net = 1.98e15, 3.35e12, 8 * 400e9 / 8
    assert result["step3_sparsity"] == pytest.approx(s)
    assert result["b_moe_tokens"]["H800"] == pytest.approx(peak / (2 * s * bw))
    assert result["min_moe_sparsity"]["H800"] == pytest.approx(3 * 7168 * 61 * (peak / bw) / (2 * net * 0.0166))
    # The paper's closed form, H F L / (Net W 11.1 ms), is the same bound.
    assert result["min_moe_sparsity"]["H800"] == pytest.approx(7168 * peak * 61 / (net * bw * 0.01107), rel=0.01)
    assert s > result["min_moe_sparsity"]["H800"]


def test_every_catalog_model_on_the_papers_cards_and_a_priced_h100(tmp_path):
    result = run_cost(CostSpec(prices={"H100": 2.5}))
    assert {(r["model"], r["context"]) for r in result["rows"]} == {(m, c) for m in CATALOG for c in (8192, 32768)}
    for r in result["rows"]:
        assert set(r["usd_per_1m_attention"]) == {"H800", "H20", "A800", "910B", "H100"}
        assert r["usd_per_1m_afd_best"] <= min(r["usd_per_1m_single"].values())
    json.dumps(result)  # the --json output
    with pytest.raises(ValueError, match="unknown hardware"):
        run_cost(CostSpec(hardware=("TPU",)))
    with pytest.raises(ValueError, match="neither in the catalog"):
        run_cost(CostSpec(models=("GPT-5",)))


def test_an_hf_config_gives_the_same_model_as_its_catalog_entry(tmp_path):
    """Qwen3-235B-A22B's public config.json fields, read through the config path."""
    (tmp_path / "config.json").write_text(json.dumps({
        "_name_or_path": "qwen3-moe", "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "moe_intermediate_size": 1536, "intermediate_size": 12288}))
    model = model_from_hf_config(tmp_path)
    catalog = CATALOG["Qwen3-235B-A22B"]
    for ctx in (8192, 32768):
        assert model.per_token(ctx) == catalog.per_token(ctx)
    assert model.sparsity == catalog.sparsity == 8 / 128


def test_an_mla_moe_hf_config_gives_deepseek_v3s_catalog_entry(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
        "intermediate_size": 18432, "first_k_dense_replace": 3}))
    model, catalog = model_from_hf_config(tmp_path / "config.json"), CATALOG["DeepSeek-V3"]
    assert model.per_token(8192) == catalog.per_token(8192)
    assert model.sparsity == catalog.sparsity == 9 / 257


def test_cost_against_context_by_hand_and_its_plot(tmp_path):
    """Qwen3-32B on H800 at 1K: KV-bound attention (FLOP/byte 4 n_q d / (2 n_kv d b) = 32 < H800's 591) plus linear
    and FFN FLOPs, each priced by the card's unit costs; the plot is written."""
    from afdserve.bench.cost import cost_against_context, plot_cost_against_context

    curves = cost_against_context(CostSpec(models=("Qwen3-32B", "Step-3")), "H800", (1024, 131072))
    u_flop, u_byte = 2.0 / (3600 * 1.98e15), 2.0 / (3600 * 3.35e12)
    kv = 64 * 2 * 8 * 128 * 1 * 1024
    linear = 2 * 64 * (5120 * (64 + 16) * 128 + 64 * 128 * 5120)
    ffn = 2 * 64 * 3 * 5120 * 25600
    assert curves["Qwen3-32B"][0] == (1024, pytest.approx(1e6 * (kv * u_byte + (linear + ffn) * u_flop)))
    assert curves["Step-3"][1][1] > curves["Step-3"][0][1]  # longer contexts cost more
    path = plot_cost_against_context(curves, "H800", tmp_path / "cost.png")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="H100 has no price"):
        cost_against_context(CostSpec(models=("Step-3",)), "H100")


def test_bench_cost_plan_and_kinetics_commands_write_their_outputs(tmp_path, capsys):
    from afdserve.engine.cli import main

    assert main(["bench", "cost", "--model", "Step-3", "--json", str(tmp_path / "c.json"),
                 "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists() and json.loads((tmp_path / "c.json").read_text())["rows"]
    assert main(["bench", "plan", "--json", str(tmp_path / "p.json")]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["step3_2a2f"]["paper"]["x"] == 2 and plan["plans"]
    assert "Step-3 2A2F" in capsys.readouterr().out
    assert main(["bench", "kinetics", "--models", "Qwen3-0.6B", "Qwen3-8B", "--plot", str(tmp_path / "k.png"),
                 "--json", str(tmp_path / "k.json")]) == 0
    kin = json.loads((tmp_path / "k.json").read_text())
    assert set(kin["frontier"]) == {"bestofn", "longcot"} and (tmp_path / "k.png").exists()
