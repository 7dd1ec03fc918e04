"""Incremental detokenizer: turns a growing list of token ids into text deltas, and finds stop strings.

Decoding a window of recent tokens (not the whole output) each step keeps the cost constant; a delta ending in
U+FFFD means a multi-byte character is still incomplete, so it waits for the next token. A stop string may span
tokens: the text is searched from just before the new delta, cut where the stop string begins, and the stop string
itself is never returned. `stream_delta` holds back any tail that could still become a stop string.
"""
from __future__ import annotations

from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PREFIX_WINDOW = 5  # prompt tokens kept as context for the first output token


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids = list(prompt_ids[-_PREFIX_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""
        self._streamed = 0  # characters of output_text already handed out by stream_delta
        self._num_output_tokens = 0
        self._max_stop_len = max((len(s) for s in params.stop), default=0)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Adds tokens; returns the stop string if one now appears (output_text is then cut before it)."""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self._num_output_tokens += 1
            delta = self._decode_delta()
            if not delta:
                continue
            self.output_text += delta
            # Like EOS and stop token ids, a stop string cannot end the output before min_tokens tokens.
            if self._num_output_tokens < self.params.min_tokens:
                continue
            stop = self._find_stop(len(delta))
            if stop is not None:
                return stop
        return None

    def stream_delta(self, finished: bool) -> str:
        """Text not yet handed out, less a tail that could begin a stop string (all of it when finished)."""
        end = len(self.output_text)
        if not finished and self._max_stop_len:
            end = max(self._streamed, end - (self._max_stop_len - 1))
        delta = self.output_text[self._streamed:end]
        self._streamed = end
        return delta

    def _decode_delta(self) -> str:
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset], skip)
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset:], skip)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return full[len(prefix):]
        return ""

    def _find_stop(self, delta_len: int) -> str | None:
        if not self._max_stop_len:
            return None
        search_from = max(0, len(self.output_text) - delta_len - self._max_stop_len + 1)
        best = None
        for stop in self.params.stop:
            at = self.output_text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        self.output_text = self.output_text[:best[0]]
        return best[1]
