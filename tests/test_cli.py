"""The `afdserve` command line as a user runs it: a subprocess, checked against the offline API."""
from __future__ import annotations

import subprocess
from pathlib import Path

from afdserve import LLM, SamplingParams
from conftest import AFDSERVE_COMMAND

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def afdserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(AFDSERVE_COMMAND + list(args), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_generate_prints_the_offline_greedy_text(smollm2_dir):
    cache_dir = smollm2_dir.parent
    result = afdserve("generate", "--model", "smollm2", "--prompt", PROMPT, "--max-tokens", "8", "--dtype", "float32",
                      "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    llm = LLM("smollm2", dtype="float32", cache_dir=cache_dir, num_kv_blocks=16)
    expected = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert len(expected.token_ids) == 8 and expected.text.strip()
    assert result.stdout == expected.text + "\n"


def test_bad_model_path_exits_nonzero_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    result = afdserve("generate", "--model", str(missing), "--prompt", PROMPT)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_sampling_flag_exits_nonzero_naming_it(tmp_path):
    result = afdserve("generate", "--model", str(tmp_path), "--prompt", PROMPT, "--max-tokens", "0")
    assert result.returncode != 0
    assert "max_tokens must be an integer >= 1, got 0" in result.stderr and "Traceback" not in result.stderr


def test_readme_refactor_writes_a_model_that_serves(smollm2_dir, tmp_path):
    import json
    import shutil

    from conftest import make_tiny_model

    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    make_tiny_model(tmp_path / "dense", "llama", vocab_size=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer that reads English
        shutil.copy(smollm2_dir / name, tmp_path / "dense" / name)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    result = afdserve("readme-refactor", "--model", str(tmp_path / "dense"), "--experts", "4", "--router-steps", "5",
                      "--calibration-file", str(calibration), "--out", str(tmp_path / "readme"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {tmp_path / 'readme'}\n"
    with LLM(str(tmp_path / "readme"), dtype="float32") as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    result = afdserve("readme-refactor", "--model", str(tmp_path / "dense"), "--experts", "4", "--top-k", "5",
                      "--out", str(tmp_path / "bad"))
    assert result.returncode != 0 and "top_k must be in [1, num_experts = 4], got 5" in result.stderr
    assert "Traceback" not in result.stderr
