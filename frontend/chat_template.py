"""A checkpoint's chat template, rendered as ``transformers``' ``apply_chat_template`` does.

NOTE: a chat template is code from the model's author (jinja2), so it runs in jinja2's
``ImmutableSandboxedEnvironment`` with what transformers gives templates and nothing more:
``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` globals, a
``tojson`` filter that does not escape HTML, the loop-control extension, and the tokenizer's
special tokens (``bos_token``, ``eos_token``, ...) as variables. The rendered text already holds
the template's special tokens, so it is tokenized without adding any, as transformers and vLLM
do (``frontend.prompt_encoder.encode_chat``). The template comes from ``tokenizer_config.json``'s ``chat_template``
(a string, or a list of ``{"name", "template"}`` of which "default" is used) or, as transformers
5 saves it, from ``chat_template.jinja`` beside it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stagemesh.errors import InvalidArgument

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
"""The special tokens ``tokenizer_config.json`` may name, handed to the template as transformers does."""
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplate:
    """Renders a conversation into a prompt; ``render`` raises ``InvalidArgument`` naming the
    problem when the checkpoint has no usable template or the template refuses the messages."""

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None, problem: str = ""):
        self.source = source
        """The template's jinja2 text; None when there is none."""
        self.special_tokens = dict(special_tokens or {})
        self.problem = problem
        """Why chat cannot be served (no template, or one that does not compile); "" when it can."""
        self._compiled: jinja2.Template | None = None
        if source is not None and not problem:
            try:
                self._compiled = _environment().from_string(source)
            except jinja2.TemplateError as err:
                self.problem = f"this model's chat template does not compile: {err}"

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        """The template of a checkpoint directory (one that says why it cannot render when there is none)."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        special = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if config.get(name)}
        source = _template_source(config.get("chat_template"))
        if source is None and (model_dir / TEMPLATE_FILE).is_file():
            source = (model_dir / TEMPLATE_FILE).read_text()
        if source is None:
            problem = (f"this model has no chat template (no chat_template in {model_dir.name}/tokenizer_config.json "
                       f"and no {TEMPLATE_FILE}); use /v1/completions with a prompt in the model's own format")
            return cls(None, special, problem)
        return cls(source, special)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> str:
        """The prompt text of ``messages`` (dicts with ``role`` and ``content``), ending with the
        assistant's turn when ``add_generation_prompt``; ``extra``: more template variables."""
        if self._compiled is None:
            raise InvalidArgument(self.problem)
        # ``tools`` and ``documents`` are there as None, as transformers passes them: templates ask
        # ``tools is not none``, which an undefined variable would pass
        variables = {**(extra or {}), **self.special_tokens, "messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**variables)
        except jinja2.TemplateError as err:
            raise InvalidArgument(f"the model's chat template refused the messages: {err}") from None


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (``_cached_compile_jinja_template``)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
            ) -> str:
    """jinja2's own ``tojson`` escapes HTML characters; templates expect plain JSON."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_source(value: Any) -> str | None:
    """``chat_template`` as a string, or the "default" of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None


def _token_text(token: str | dict) -> str:
    """A special token given as ``"<s>"`` or ``{"content": "<s>", ...}`` (older files)."""
    return token.get("content", "") if isinstance(token, dict) else str(token)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
