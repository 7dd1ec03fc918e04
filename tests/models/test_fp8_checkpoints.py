"""Block-scaled fp8 checkpoints, the format DeepSeek-V3 and Qwen3's -FP8 releases ship (`quantization_config`:
quant_method fp8, weight_block_size, dynamic activations; each fp8 weight with a `weight_scale_inv` per block).

The checkpoints are written here from a tiny random model by the block quantizer below (written from the format's
definition: scale = max|block| / 448, codes = e4m3(w / scale), the scale stored as weight_scale_inv, partial blocks
at the edges). The oracle is transformers loading the same directory (its FineGrainedFP8 path dequantizes on a
CPU): the engine's greedy tokens and logprobs equal it."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import generate_and_compare, make_tiny_model
from afdserve import LLM
from afdserve.kernels.quant_linear import dequantize_fp8_blocks
from afdserve.models.hf_config import load_transformer_config

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]
BLOCK = (16, 16)
# DeepSeek-V3 keeps these in bf16: embeddings, norms, the router and the LM head; every other linear weight is fp8.
UNQUANTIZED = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight")


def quantize_blocks(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    rows, cols = -(-n // block[0]), -(-k // block[1])
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[:n, :k] = w.float()
    blocks = padded.view(rows, block[0], cols, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block[0], cols * block[1])
    return codes[:n, :k].contiguous(), scale


def write_fp8_checkpoint(directory, block=BLOCK) -> int:
    """Rewrites a saved model's linear weights as block-scaled fp8; returns how many it quantized."""
    path = directory / "model.safetensors"
    tensors, quantized = {}, 0
    for name, tensor in load_file(str(path)).items():
        if tensor.dim() == 2 and not any(part in name for part in UNQUANTIZED):
            tensors[name], tensors[f"{name}_scale_inv"] = quantize_blocks(tensor, block)
            quantized += 1
        else:
            tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps(config))
    return quantized


def transformers_from(directory):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch, overrides", [
    # Every dimension a multiple of the block: transformers' dequantization needs it (ours takes partial blocks too,
    # as DeepSeek-V3's 576-row kv_a_proj_with_mqa has: the unit test below)
    ("qwen3", dict(intermediate_size=48)),
    ("deepseek_v3", dict(num_hidden_layers=2, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48,
                         qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, first_k_dense_replace=1,
                         moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         n_group=2, topk_group=1)),
])
def test_block_fp8_checkpoint_matches_transformers(arch, overrides, tmp_path):
    original = make_tiny_model(tmp_path, arch, mlp_std=0.1, **overrides)
    assert write_fp8_checkpoint(tmp_path) > 0
    hf = transformers_from(tmp_path)
    # The rounding is real: the fp8 model is not the original one.
    q_name = "model.layers.0.self_attn." + ("q_proj.weight" if arch == "qwen3" else "q_a_proj.weight")
    assert not torch.equal(hf.get_parameter(q_name), original.get_parameter(q_name))
    with LLM(str(tmp_path), dtype="float32") as llm:
        generate_and_compare(llm, hf, PROMPTS, new_tokens=12, top=5)


def test_dequantized_blocks_are_the_codes_times_their_blocks_scale():
    w = torch.randn(40, 70)
    codes, scale = quantize_blocks(w)
    got = dequantize_fp8_blocks(codes, scale, BLOCK)
    for i, j in [(0, 0), (17, 33), (39, 69), (32, 64)]:  # interior, and the partial last blocks
        assert got[i, j] == codes[i, j].float() * scale[i // 16, j // 16]
    assert (got - w).abs().max() <= w.abs().max() / 16  # e4m3 keeps 3 mantissa bits
    with pytest.raises(ValueError, match=r"blocks of 16 x 16 needs 3 x 5 scales, got \(3, 4\)"):
        dequantize_fp8_blocks(codes, scale[:, :4], BLOCK)


def _config_with(tmp_path, quantization: dict):
    make_tiny_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))


@pytest.mark.parametrize("quantization, words", [
    (dict(quant_method="awq", bits=4), "quant_method 'awq'; afdserve loads unquantized checkpoints and fp8"),
    (dict(quant_method="fp8", activation_scheme="dynamic"), "fp8 without weight_block_size"),
    (dict(quant_method="fp8", weight_block_size=[128, 128], activation_scheme="static"), "activation_scheme 'static'"),
    (dict(quant_method="fp8", weight_block_size=[128, 128], scale_fmt="ue8m0"), "scale_fmt 'ue8m0'"),
])
def test_other_quantized_checkpoints_are_refused_by_name(quantization, words, tmp_path):
    _config_with(tmp_path, quantization)
    with pytest.raises(ValueError, match="quantization_config") as info:
        load_transformer_config(tmp_path)
    assert words in str(info.value)


def test_a_weight_without_its_scale_is_named(tmp_path):
    make_tiny_model(tmp_path, "llama")
    write_fp8_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"fp8 checkpoint: 1 fp8 weight\(s\) without a weight_scale_inv.*"
                                         r"'model.layers.1.mlp.down_proj.weight'"):
        LLM(str(tmp_path), dtype="float32")
