"""POST /tokenize and /detokenize in vLLM's shapes: a prompt (or chat messages, through the chat template) to
token ids with the count and the context length; token ids back to text."""
from __future__ import annotations

from afdserve.engine.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from afdserve.engine.server.serving_common import ServingContext


class TokenizationServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Any length: the count is what a client asks for, also beyond the context."""
        self.ctx.check_model(request.model)
        if request.messages is not None:
            messages = [m.to_template_dict() for m in request.messages]
            tokens = await self.ctx.chat_prompt_ids(messages, request.add_generation_prompt, check_length=False)
        else:
            tokens = await self.ctx.tokenize(request.prompt, "prompt", request.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=self.ctx.engine.max_model_len, tokens=tokens)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(request.model)
        self.ctx.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=self.ctx.tokenizer.decode(request.tokens, skip_special_tokens=False))
