"""A chat message's optional `name` reaches the chat template (as vLLM passes it), for templates that render it."""
import json

from conftest import write_byte_tokenizer
from afdserve.engine.server.protocol import ChatMessage
from afdserve.engine.tokenizer import Tokenizer

NAME_TEMPLATE = "{% for m in messages %}{{ m.get('name', '-') }}:{{ m['content'] }};{% endfor %}"


def test_message_name_reaches_the_chat_template(tmp_path):
    write_byte_tokenizer(tmp_path, 8)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": NAME_TEMPLATE}))
    messages = [ChatMessage(role="user", content="hi", name="ann"), ChatMessage(role="developer", content="yo")]
    rendered = Tokenizer(tmp_path).apply_chat_template([m.to_template_dict() for m in messages],
                                                       add_generation_prompt=False)
    assert rendered == "ann:hi;-:yo;"
