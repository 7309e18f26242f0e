"""Chat templates render (and tokenize) as transformers' own ``apply_chat_template`` does."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from frontend.chat_template import TEMPLATE_FILE, ChatTemplate
from frontend.prompt_encoder import encode_chat
from stagemesh.cli.demo import write_tokenizer
from stagemesh.errors import InvalidArgument
from stagemesh.tokenizer import Tokenizer

SIMPLE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ALTERNATING = """
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}{% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system is defined %}[SYS]{{ system }}[/SYS]
    {% endif %}
    {{ '[' + message['role'] | upper + '] ' + message['content'] | trim }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}
"""
"""Block tags on lines of their own (``trim_blocks``/``lstrip_blocks`` matter) and ``raise_exception``."""
RICH = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'skip' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{{ ns.n }}:{{ m | tojson }}
{% endfor -%}
{%- if tools is not none %}TOOLS{% endif -%}
{%- if enable_thinking is defined and not enable_thinking %}<no-think>{% endif -%}
{{ eos_token if not add_generation_prompt else '>' }}"""
"""``namespace``, loop controls, ``tojson`` (not HTML-escaped), ``tools`` there as None, a kwarg."""
CONVERSATIONS = [
    [{"role": "user", "content": "hi <b>&</b> ünïcode"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  a  "},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": "x"}, {"role": "skip", "content": "y"}, {"role": "assistant", "content": "z"}],
]


def checkpoint(root: Path, template) -> Path:
    write_tokenizer(root, vocab_size=320, model_max_length=256)
    path = root / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if template is not None:
        config["chat_template"] = template
    path.write_text(json.dumps(config))
    return root


def hf_tokenizer(root: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(root)


@pytest.mark.parametrize("source", [SIMPLE, ALTERNATING, RICH], ids=["simple", "alternating", "rich"])
def test_rendered_text_and_token_ids_are_transformers(tmp_path, source):
    root = checkpoint(tmp_path, source)
    ours, theirs, tokenizer = ChatTemplate.from_dir(root), hf_tokenizer(root), Tokenizer.from_dir(root)
    for messages in CONVERSATIONS:
        try:
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as err:
            with pytest.raises(InvalidArgument, match="chat template refused the messages: Conversation roles"):
                ours.render(messages)
            assert "alternate" in str(err)
            continue
        assert ours.render(messages) == expected
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert list(encode_chat(tokenizer, expected)) == ids  # no second BOS: the template has its own


def test_template_kwargs_reach_the_template_as_in_transformers(tmp_path):
    root = checkpoint(tmp_path, RICH)
    messages = CONVERSATIONS[0]
    expected = hf_tokenizer(root).apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                      enable_thinking=False)
    assert ChatTemplate.from_dir(root).render(messages, add_generation_prompt=False,
                                              extra={"enable_thinking": False}) == expected
    assert "<no-think>" in expected and "&" in expected


def test_the_template_may_come_from_a_named_list_or_chat_template_jinja(tmp_path):
    named = checkpoint(tmp_path / "named", [{"name": "tool_use", "template": "T"}, {"name": "default",
                                                                                 "template": SIMPLE}])
    assert ChatTemplate.from_dir(named).render(CONVERSATIONS[0]).startswith("<s><|user|>hi")
    separate = checkpoint(tmp_path / "file", None)
    (separate / TEMPLATE_FILE).write_text(SIMPLE)
    assert ChatTemplate.from_dir(separate).render(CONVERSATIONS[0]).endswith("</s><|assistant|>")


def test_no_template_or_a_broken_one_is_a_400_naming_the_problem(tmp_path):
    none = ChatTemplate.from_dir(checkpoint(tmp_path / "none", None))
    with pytest.raises(InvalidArgument, match="this model has no chat template .*tokenizer_config.json.*"
                                              "use /v1/completions"):
        none.render(CONVERSATIONS[0])
    broken = ChatTemplate.from_dir(checkpoint(tmp_path / "broken", "{% for m in messages %}"))
    with pytest.raises(InvalidArgument, match="chat template does not compile"):
        broken.render(CONVERSATIONS[0])


def test_the_sandbox_refuses_what_a_template_must_not_do(tmp_path):
    template = ChatTemplate.from_dir(checkpoint(tmp_path, "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(InvalidArgument, match="refused the messages"):
        template.render(CONVERSATIONS[0])
    mutate = ChatTemplate.from_dir(checkpoint(tmp_path / "m", "{{ messages.append(1) }}"))
    with pytest.raises(InvalidArgument, match="refused the messages"):
        mutate.render(CONVERSATIONS[0])
