"""The offline API: `LLM(model=..., dtype=...).generate(prompts, params)` and `.chat(messages, params)`."""
from __future__ import annotations

from tqdm import tqdm

from afdserve.engine.config import EngineConfig, ModelConfig, engine_config
from afdserve.engine.llm_engine import LLMEngine
from afdserve.engine.outputs import RequestOutput
from afdserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = ModelConfig.model, config: EngineConfig | None = None, **engine_args):
        """Engine arguments as keywords (the fields of engine/config.py, see engine_config), or a whole EngineConfig."""
        self.engine = LLMEngine(config or engine_config(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                rid = self.engine.new_request_id()
                self.engine.add_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            # Otherwise the requests added before the bad one would stay in the engine, run by later calls.
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (vLLM's LLM.reset_prefix_cache), so the next requests compute their whole
        prompts: runs that compare costs start from the same cache."""
        self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """Releases the executor (with --afd: its Ray actors and shared memory)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished() and len(done) < len(wanted):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[rid] for rid in request_ids]


def _as_prompt_list(prompts) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)
