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
