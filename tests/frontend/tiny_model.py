"""The tiny model the frontend tests serve: its config (nothing is loaded) and a directory with its
tokenizer, for the frontends' servicers run against a fake gateway link."""

from __future__ import annotations

import json
from pathlib import Path

from stagemesh.cli.demo import write_tokenizer
from stagemesh.config import ModelConfig

CONFIG = ModelConfig.from_dict({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 16, "max_position_embeddings": 256,
})


def write_model_dir(root: Path, chat_template: str | None = None) -> Path:
    """``root`` with the tokenizer of ``CONFIG`` (and ``chat_template`` in its tokenizer_config.json)."""
    write_tokenizer(root, vocab_size=CONFIG.vocab_size, model_max_length=CONFIG.max_position_embeddings)
    if chat_template is not None:
        config = json.loads((root / "tokenizer_config.json").read_text())
        (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return root
