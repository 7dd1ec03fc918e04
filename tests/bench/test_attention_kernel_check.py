"""bench/gpu/attention_kernel_check.py's CPU-importable parts: its target shape, its refusal without CUDA, and its
correctness checks and config sweep run on tiny shapes under the Triton interpreter (the GPU runs them compiled).

TRITON_INTERPRET is set around the import of triton_paged and around the tests, as in tests/kernels/test_triton_moe.py.
"""
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")
from afdserve.kernels.triton_interpret import INTERPRET, import_triton_module, interpreter_env  # noqa: E402

triton_paged = import_triton_module("afdserve.kernels.attention.triton_paged")

from afdserve.bench.gpu import attention_kernel_check as check  # noqa: E402

TINY = replace(check.TARGET, batch=2, context=40, chunk=8, kv_heads=2, head_dim=16, groups=(3,), repeats=1,
               device="cpu")
pytestmark = pytest.mark.skipif(not INTERPRET, reason="run the check itself on a GPU")


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with interpreter_env():
        yield


def test_target_is_the_spec_decode_shape():
    t = check.TARGET
    assert (t.kernels, t.batch, t.context, t.kv_heads, t.head_dim, t.groups, t.dtype) == (
        ("decode",), 64, 32768, 8, 128, (4, 8), "bfloat16")


def test_main_needs_cuda(capsys):
    assert check.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_checks_pass_on_tiny_shapes_and_catch_a_mismatch(capsys):
    cpu = torch.device("cpu")
    assert check.check_decode(TINY, 3, cpu)
    assert check.check_prefill(TINY, 3, cpu)
    for kv_dtype in ("fp8_e4m3", "int8"):  # the kernel on codes against the torch backend's gather
        assert check.check_decode(replace(TINY, kv_dtype=kv_dtype), 3, cpu)
        assert check.check_prefill(replace(TINY, kv_dtype=kv_dtype), 3, cpu)
    assert not check._agree("perturbed", torch.ones(4) + 0.1, torch.ones(4))
    assert capsys.readouterr().out.count("ok  ") == 6


def test_sweep_times_every_config():
    configs = [(16, 4, 1, False), (32, 4, 1, True)]
    rows = check.sweep_decode(replace(TINY, kv_dtype="fp8_e4m3"), configs, torch.device("cpu"), peak_gbps=None)
    assert [(r["group"], r["config"]) for r in rows] == [(3, [16, 16, 4, 1, False]), (3, [16, 32, 4, 1, True])]
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)


def junit(tests: int, skipped: int = 0, failures: int = 0, errors: int = 0) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="{tests}" '
            f'skipped="{skipped}" failures="{failures}" errors="{errors}"></testsuite></testsuites>')


def test_kernel_tests_count_as_passed_only_when_some_ran_and_none_failed():
    assert check.kernel_test_counts(junit(12, skipped=1), 0) == {"passed": 11, "failed": 0, "skipped": 1, "ok": True}
    # pytest exits 0 when every test skipped: that is no evidence (issue 19, item 14)
    assert check.kernel_test_counts(junit(12, skipped=12), 0)["ok"] is False
    assert check.kernel_test_counts(junit(15, skipped=2, failures=1), 1) == {"passed": 12, "failed": 1, "skipped": 2,
                                                                           "ok": False}
    assert check.kernel_test_counts(junit(3, errors=3), 2)["ok"] is False
    assert check.kernel_test_counts("", 4)["ok"] is False  # pytest did not even write its report
