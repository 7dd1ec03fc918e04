"""bench/mla_prefill.py on a short chunk: it runs, and the engine's decompressed MLA prefill equals the absorbed form
written in the bench (the same attention, computed the other way round)."""
from afdserve.bench import mla_prefill


def test_decompressed_and_absorbed_prefill_agree():
    row = mla_prefill.run(tokens=40, dtype=mla_prefill.torch.float32, repeats=1)
    assert row["max_abs_difference"] < 1e-4
    assert row["decompressed_ms_median"] > 0 and row["absorbed_ms_median"] > 0
