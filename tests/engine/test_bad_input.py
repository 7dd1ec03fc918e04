"""Bad input fails at the door with a ValueError / FileNotFoundError naming the field or file at fault, and never
disturbs requests already in the engine."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import hf_greedy, make_tiny_model
from afdserve import LLM, SamplingParams

CONTEXT = 64  # the engine's max_model_len here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, make_tiny_model(directory, "llama")


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny[0]), dtype="float32", num_kv_blocks=16, max_model_len=CONTEXT)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


# ---- sampling parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -1), ("n", 0), ("n", -1), ("top_p", 0), ("top_p", 1.5),
    ("temperature", -0.5), ("top_k", -2), ("logprobs", -1),
])
def test_bad_sampling_param_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field} .*got {value!r}$"):
        SamplingParams(**{field: value})


def test_sampling_params_beyond_the_vocabulary_are_refused(llm):
    for params, field in [(SamplingParams(logprobs=1000), "logprobs"),
                          (SamplingParams(prompt_logprobs=257), "prompt_logprobs"),
                          (SamplingParams(stop_token_ids=[256], min_tokens=2), "stop_token_ids"),
                          (SamplingParams(stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=field):
            llm.generate([[5, 6]], params, use_tqdm=False)
    assert not llm.engine.has_unfinished()


# ---- prompts ------------------------------------------------------------------------------------------------
def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], use_tqdm=False)
    # Text that the tokenizer turns into no tokens at all (this test tokenizer knows only "<id>" tokens).
    with pytest.raises(ValueError, match="no tokens"):
        llm.generate("hello", use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_prompt_longer_than_context(llm):
    for length in (CONTEXT + 1, CONTEXT):  # the latter fits, but leaves no room for one output token
        with pytest.raises(ValueError, match=rf"prompt is {length} tokens; the context length is {CONTEXT}"):
            llm.generate([[5] * length], use_tqdm=False)
    # max_tokens past the context is refused, as the server's 400 does, not clipped to a shorter output...
    with pytest.raises(ValueError, match=rf"max_tokens 10: {CONTEXT + 9} tokens, over the context length {CONTEXT}"):
        llm.generate([[5] * (CONTEXT - 1)], greedy(10), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    # ...while no max_tokens means "up to the context".
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    out = llm.generate([[5] * (CONTEXT - 1)], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt", [[5, 256], [-1, 5], [5, 2.0]])
def test_token_ids_outside_the_vocabulary(llm, prompt):
    with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 256\)"):
        llm.generate([prompt], use_tqdm=False)
    assert not llm.engine.has_unfinished()


# ---- other requests keep going ------------------------------------------------------------------------------
GOOD = {"a": [5, 17, 99, 3, 250, 41, 8], "b": list(range(10, 40))}


def test_bad_request_leaves_requests_in_flight_untouched(tiny, llm):
    engine = llm.engine
    for rid, prompt in GOOD.items():
        engine.add_request(rid, prompt, greedy(8))
    engine.step()  # both are running now
    bad = [("c", [999], greedy(8), "prompt token ids"),
           ("d", [5] * 80, greedy(8), "context length"),
           ("e", [5, 6], SamplingParams(logprobs=1000), "logprobs"),
           ("a", [5, 6], greedy(8), "request id 'a'")]
    for rid, prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
    assert sorted(done) == ["a", "b"]
    for rid, prompt in GOOD.items():
        assert done[rid].outputs[0].token_ids == hf_greedy(tiny[1], prompt, 8)
    assert engine.core.kv.num_free_blocks == engine.num_kv_blocks


def test_generate_with_one_bad_prompt_leaves_nothing_behind(tiny, llm):
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([GOOD["a"], GOOD["b"], [999]], greedy(8), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert llm.engine.core.kv.num_free_blocks == llm.engine.num_kv_blocks
    out = llm.generate([GOOD["b"]], greedy(8), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(tiny[1], GOOD["b"], 8)


# ---- model files --------------------------------------------------------------------------------------------
@pytest.fixture
def model_copy(tiny, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny[0], directory)
    return directory


def edit_config(directory, **fields) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_unknown_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
        LLM(str(missing))


@pytest.mark.parametrize("name, message", [("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
                                           ("model.safetensors", "*.safetensors weights")])
def test_model_directory_missing_a_file(model_copy, name, message):
    (model_copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"model directory {model_copy} has no {message}")):
        LLM(str(model_copy))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(model_copy, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(bytes(range(256)) * 8 if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"cannot read weights file {weights}")):
        LLM(str(model_copy), num_kv_blocks=16)


def test_unknown_architecture(model_copy):
    edit_config(model_copy, architectures=["FooForCausalLM"])
    with pytest.raises(ValueError, match="unsupported architecture 'FooForCausalLM'; supported: .*LlamaForCausalLM"):
        LLM(str(model_copy), num_kv_blocks=16)


def test_config_not_json_or_missing_a_field(model_copy):
    edit_config(model_copy, architectures=[])
    with pytest.raises(ValueError, match="names no 'architectures'"):
        LLM(str(model_copy))
    config = json.loads((model_copy / "config.json").read_text())
    del config["hidden_size"]
    config["architectures"] = ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json lacks required fields: 'hidden_size'"):
        LLM(str(model_copy))
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        LLM(str(model_copy))
