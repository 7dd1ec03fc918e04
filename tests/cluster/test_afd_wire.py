"""The FP8 A->F wire (`--afd-wire fp8`, cluster/wire.py) against transformers whose FFN inputs are rounded by the
formula written here: each token's hidden state scaled so that its largest |value| is 448, cast to e4m3 by torch,
scaled back. The router reads the unrounded state (it runs on the attention side, before the wire). Greedy tokens
equal and logprobs within 1e-4 (fp32), over 1A1F (dense Llama, gloo) and 1A2F (Qwen2-MoE: routed experts, a
gated shared expert, a dense layer; shm)."""
import pytest
import torch

from conftest import generate_and_compare, make_tiny_model
from afdserve import LLM
from afdserve.cluster.wire import ActivationWire

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]


def fp8_wire_formula(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    return ((x / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def round_ffn_inputs(hf) -> None:
    """A pre-hook on every module the FFN side runs (dense MLPs; experts, shared expert and its gate), not routers."""
    def hook(module, args):
        return (fp8_wire_formula(args[0]), *args[1:])
    for layer in hf.model.layers:
        parts = [layer.mlp.experts, layer.mlp.shared_expert, layer.mlp.shared_expert_gate] if hasattr(
            layer.mlp, "experts") else [layer.mlp]
        for module in parts:
            module.register_forward_pre_hook(hook)


def test_wire_round_trip_is_the_formula():
    x = torch.randn(7, 64) * torch.logspace(-2, 2, 7)[:, None]
    wire = ActivationWire("fp8")
    messages = iter(wire.encode(x))
    assert [m.dtype for m in wire.encode(x)] == [torch.float8_e4m3fn, torch.float32]  # 1 byte a value + a scale
    got = wire.decode(lambda shape, dtype: next(messages).view(shape).to(dtype), 7, 64, torch.float32)
    assert torch.equal(got, fp8_wire_formula(x))
    assert ActivationWire("auto").encode(x)[0] is x


@pytest.mark.parametrize("arch, afd, transport, overrides", [
    ("llama", "1A1F", "gloo", {}),
    ("qwen2_moe", "1A2F", "shm", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                      mlp_only_layers=[1])),
])
def test_fp8_wire_matches_transformers_with_rounded_ffn_inputs(arch, afd, transport, overrides, tmp_path):
    hf = make_tiny_model(tmp_path, arch, mlp_std=0.1, **overrides)
    round_ffn_inputs(hf)
    llm = LLM(str(tmp_path), dtype="float32", block_size=16, afd=afd, afd_transport=transport, afd_wire="fp8")
    try:
        generate_and_compare(llm, hf, PROMPTS, new_tokens=12, top=5)
    finally:
        llm.engine.shutdown()
