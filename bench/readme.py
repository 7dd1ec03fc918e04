"""`afdserve bench readme`: what refactoring a dense model into Read-ME's MoE costs in accuracy (models/readme.py).

The dense model is refactored twice on the first `calibration_tokens` of English text (`pydoc_data.topics`): with
the pre-gating router left untrained and trained against the oracle labels (models/readme_router.py). Each is
scored with every expert on (the dense model, a check) and with top-k experts per token; perplexity is over
`eval_tokens` held-out tokens from the text's second half, one prefill each. No backbone fine-tuning (Read-ME
alternates router training with fine-tuning the model on about 1B tokens).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from afdserve.bench.kv_quant import english_text, perplexity
from afdserve.engine.llm import LLM
from afdserve.engine.tokenizer import Tokenizer
from afdserve.models.readme_refactor import RefactorSpec, refactor_to_readme


@dataclass(frozen=True)
class ReadMEBenchSpec:
    refactor: RefactorSpec = RefactorSpec()
    top_ks: tuple[int, ...] = (1, 2)
    eval_tokens: int = 1024
    dtype: str = "float32"


def run_readme_bench(model_dir: Path, spec: ReadMEBenchSpec) -> dict:
    ids = Tokenizer(model_dir).encode(english_text())
    calibration = ids[:spec.refactor.calibration_tokens]
    start = max(len(ids) // 2, len(calibration))
    held_out = ids[start:start + spec.eval_tokens]
    if len(held_out) < 2:
        raise ValueError(f"the text has {len(ids)} tokens: none left to score after the calibration tokens")
    experts = spec.refactor.num_experts
    runs = [(None, 0, None)] + [(router, steps, k) for router, steps in
                                      (("untrained", 0), ("trained", spec.refactor.router_steps))
                                      for k in (experts, *spec.top_ks)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="afdserve-readme-") as tmp, tqdm(total=len(runs), desc="bench readme") as bar:
        refactored: dict[str, Path] = {}
        for router, steps, top_k in runs:
            path = Path(model_dir)
            if router is not None:
                if router not in refactored:
                    refactored[router] = refactor_to_readme(model_dir, Path(tmp) / router, calibration,
                                                            replace(spec.refactor, router_steps=steps))
                path = refactored[router]
                _set_top_k(path, top_k)
            with LLM(str(path), dtype=spec.dtype) as llm:
                ppl = perplexity(llm, held_out)
            row = dict(model="dense" if router is None else f"read-me, router {router}", top_k=top_k, perplexity=ppl)
            if router is not None:
                row["router_training"] = json.loads((path / "config.json").read_text())["readme_router_training"]
            rows.append(row)
            bar.update()
    for row in rows:
        row["vs_dense_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return dict(spec=dict(experts=experts, shared_fraction=spec.refactor.shared_fraction,
                          calibration_tokens=len(calibration), eval_tokens=len(held_out), eval_start=start,
                          router_steps=spec.refactor.router_steps, dtype=spec.dtype), rows=rows)


def _set_top_k(model_dir: Path, top_k: int) -> None:
    """The refactored checkpoint's experts per token (config.json's moe_top_k)."""
    config = json.loads((model_dir / "config.json").read_text())
    config["moe_top_k"] = top_k
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))


def format_readme_result(result: dict) -> str:
    spec = result["spec"]
    header = f"{'model':<28} {'experts/token':>13} {'perplexity':>10} {'vs dense':>9} {'router acc':>10}"
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        k = "-" if r["top_k"] is None else f"{r['top_k']} of {spec['experts']}"
        accuracy = r.get("router_training", {}).get("oracle_accuracy")
        lines.append(f"{r['model']:<28} {k:>13} {r['perplexity']:>10.3f} {r['vs_dense_pct']:>+8.1f}% "
                     f"{'' if accuracy is None else f'{accuracy:.3f}':>10}")
    lines.append(f"perplexity over {spec['eval_tokens']} held-out tokens (from token {spec['eval_start']}); "
                 f"refactored on the first {spec['calibration_tokens']}; {spec['experts']} experts + "
                 f"{spec['shared_fraction']:.0%} shared channels; router trained {spec['router_steps']} steps "
                 f"(accuracy: its top-1 against the oracle labels on the calibration tokens, chance "
                 f"{1 / spec['experts']:.3f}); {spec['dtype']}")
    return "\n".join(lines)
