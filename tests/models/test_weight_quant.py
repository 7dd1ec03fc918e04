"""--quantization int8, int4 and fp8 on tiny random Llamas against transformers whose linears are replaced by the
formula, written here without the engine's code: int8 per output channel s = max|w| / 127 and codes round(w / s); int4
llama.cpp's Q4_1 per group of 32 input channels (int4_formula); for these two the product reads its input rounded to
bf16 and rounds its output to bf16 (the kernels' activation dtype, kernels/quant_linear.py), the bias added after,
and logprobs agree within 5e-3 (fp32 model; the slack is bf16 rounding ties: ~2e-3 seen). fp8: weights per channel
and inputs per token cast to e4m3 by torch, multiplied in fp32 (within 1e-3), the LM head left as it is. Greedy tokens
equal. The tied variant checks that the LM head is quantized (int8, int4) while the embedding lookup keeps the table
as it is."""
import pytest
import torch
from torch import nn

from conftest import generate_and_compare, make_tiny_model
from afdserve import LLM
from afdserve.models.loader import weight_bytes

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]


def int8_formula(module: nn.Linear):
    w = module.weight.detach().clone()
    scale = w.abs().amax(dim=1) / 127
    weight = (w / scale[:, None]).round() * scale.bfloat16().float()[:, None]
    bias = None if module.bias is None else module.bias.detach().clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = (x.bfloat16().float() @ weight.T).bfloat16().to(x.dtype)
        return out if bias is None else out + bias
    return forward


def int4_formula(module: nn.Linear):
    """llama.cpp's Q4_1 per group of 32 input channels: scale = (max - min) / 15, codes round((w - min) / scale),
    the weight (code - 8) * scale + (min + 8 * scale) with scale and zero rounded to bf16; bf16 in and out."""
    w = module.weight.detach().clone()
    n, k = w.shape
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    codes = ((g - lo) / scale).round().clamp(0, 15)
    weight = ((codes - 8) * scale.bfloat16().float() + (lo + 8 * scale).bfloat16().float()).view(n, k)
    bias = None if module.bias is None else module.bias.detach().clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = (x.bfloat16().float() @ weight.T).bfloat16().to(x.dtype)
        return out if bias is None else out + bias
    return forward


def fp8_formula(module: nn.Linear):
    """W8A8 e4m3: the weight per output channel and the input per token scaled so that its largest |value| is 448,
    rounded to e4m3 by torch's cast, multiplied in fp32, the bias added after."""
    w = module.weight.detach().clone().float()
    w_scale = w.abs().amax(dim=1, keepdim=True) / 448
    weight = (w / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    bias = None if module.bias is None else module.bias.detach().clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_scale = x.float().abs().amax(dim=-1, keepdim=True) / 448
        out = ((x.float() / x_scale).to(torch.float8_e4m3fn).float() * x_scale @ weight.T).to(x.dtype)
        return out if bias is None else out + bias
    return forward


def quantize_like_the_formula(hf, formula=int8_formula, head: bool = True) -> None:
    """Every linear of the decoder layers and (with `head`) the LM head computed by the formula; a tied head gets its
    own."""
    for layer in hf.model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.forward = formula(module)
    if head:
        hf.lm_head.forward = formula(hf.lm_head)


@pytest.mark.parametrize("case", [dict(), dict(tie_word_embeddings=True, attention_bias=True)])
def test_int8_model_matches_transformers_with_rounded_weights(case, tmp_path):
    hf = make_tiny_model(tmp_path, "llama", **case)
    quantize_like_the_formula(hf)  # the embedding table, tied to the head or not, stays as it is for the lookup
    with LLM(str(tmp_path), dtype="float32", block_size=16, quantization="int8") as llm:
        generate_and_compare(llm, hf, PROMPTS, new_tokens=16, top=5, atol=5e-3)
        model = llm.engine.core.executor.runner.model
        assert model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    with LLM(str(tmp_path), dtype="float32", block_size=16) as full:
        full_bytes = weight_bytes(full.engine.core.executor.runner.model)
    assert weight_bytes(model) < full_bytes  # int8 codes and fp32 scales instead of fp32 weights


@pytest.mark.parametrize("quantization, formula, code_dtype, atol", [
    ("int4", int4_formula, torch.uint8, 5e-3),  # bf16 activations: rounding ties
    ("fp8", fp8_formula, torch.float8_e4m3fn, 1e-3),  # fp32 around the e4m3 codes
])
@pytest.mark.parametrize("case", [dict(), dict(tie_word_embeddings=True, attention_bias=True)])
def test_grouped_and_fp8_models_match_transformers_with_the_formula(quantization, formula, code_dtype, atol, case,
                                                                   tmp_path):
    hf = make_tiny_model(tmp_path, "llama", **case)
    quantize_like_the_formula(hf, formula, head=quantization != "fp8")  # fp8 keeps the head, as vLLM's does
    with LLM(str(tmp_path), dtype="float32", block_size=16, quantization=quantization) as llm:
        generate_and_compare(llm, hf, PROMPTS, new_tokens=16, top=5, atol=atol)
        model = llm.engine.core.executor.runner.model
        assert model.layers[0].mlp.down_proj.weight.dtype == code_dtype


def test_fp8_mlp_shards_sum_to_each_shards_formula():
    """FFN sharding keeps fp8 codes with their channel scales: each shard is the W8A8 formula on its slice of the
    intermediate dimension (its down input scaled per token over its own columns), and the shards sum to the MLP
    within fp8's error."""
    from afdserve.models.layers.mlp import GatedMLP
    torch.manual_seed(0)
    full = GatedMLP(64, 96)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.2)
    weights = {name: p.detach().clone() for name, p in full.named_parameters()}
    x = torch.randn(5, 64)
    partials = []
    for rank in range(2):
        mlp = GatedMLP(64, 96)
        mlp.load_state_dict(weights)
        mlp.eval().gate_up_proj.prepare_for_inference("fp8")
        mlp.down_proj.prepare_for_inference("fp8")
        mlp.shard_(rank, 2)
        assert mlp.down_proj.weight.dtype == torch.float8_e4m3fn
        lo, hi = 48 * rank, 48 * (rank + 1)
        # the formula quantizes over whole rows of the unsharded weights (channel scales), then keeps the slice
        ref_gate_up = nn.Linear(64, 192, bias=False)
        ref_gate_up.weight.data = weights["gate_up_proj.weight"]
        ref_down = nn.Linear(96, 64, bias=False)
        ref_down.weight.data = weights["down_proj.weight"]
        g, u = fp8_formula(ref_gate_up)(x).chunk(2, dim=-1)
        h = (torch.nn.functional.silu(g) * u)[:, lo:hi]
        w_scale = ref_down.weight.abs().amax(dim=1, keepdim=True) / 448
        down_codes = (ref_down.weight / w_scale).to(torch.float8_e4m3fn).float() * w_scale
        h_scale = h.abs().amax(dim=-1, keepdim=True) / 448
        expected = (h / h_scale).to(torch.float8_e4m3fn).float() * h_scale @ down_codes[:, lo:hi].T
        got = mlp(x)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        partials.append(got)
    with torch.no_grad():
        exact = full(x)
    # three e4m3 roundings on the way (x, h and the weights, each within 2^-4), measured ~6% of the mean |output|
    assert (sum(partials) - exact).abs().mean() < 0.1 * exact.abs().mean()


def test_quantization_is_refused_off_the_cpu_and_unknown_names_clearly():
    from afdserve.engine.config import EngineConfig, ModelConfig, ParallelConfig
    with pytest.raises(ValueError, match="quantization must be one of int8, int4"):
        ModelConfig(quantization="int3")
    with pytest.raises(ValueError, match="FFN sharding would split; afd 1A2F has 2 FFN workers"):
        EngineConfig(model=ModelConfig(quantization="int4"), parallel=ParallelConfig(afd="1A2F"))


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_router_gates_stay_unquantized(quantization, tmp_path):
    """A quantized DeepSeek-V3 keeps its fp32 router gates as they are: every MoE layer routes random hidden states
    to the experts, with the weights, that transformers' own DeepseekV3TopkRouter gives (the gate is read as a plain
    weight for its fp32 logits, which quantized codes would silently break)."""
    hf = make_tiny_model(tmp_path, "deepseek_v3", mlp_std=0.1, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
                         qk_nope_head_dim=24, v_head_dim=20, first_k_dense_replace=1, moe_intermediate_size=32,
                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2)
    x = torch.randn(9, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with LLM(str(tmp_path), dtype="float32", quantization=quantization) as llm:
        layers = llm.engine.core.executor.runner.model.layers
        routed = [(ours, theirs) for ours, theirs in zip(layers, hf.model.layers) if ours.router is not None]
        assert len(routed) == 2
        for ours, theirs in routed:
            assert ours.router.gate.weight.dtype == torch.float32
            routing = ours.router(x)
            with torch.no_grad():
                _, weights, ids = theirs.mlp.gate(x)
            got_ids, got_order = routing.topk_ids.sort(-1)
            want_ids, want_order = ids.sort(-1)
            assert torch.equal(got_ids, want_ids)
            assert torch.allclose(routing.topk_weights.gather(-1, got_order), weights.gather(-1, want_order),
                                  atol=1e-6)
