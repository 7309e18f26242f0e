"""A pipeline stage of a decoder-only model: only its own layers, global layer numbers kept.

Stage 0 embeds token ids; the last stage applies the final norm and ``lm_head``. The same
``StageModel`` runs the whole model (one stage), a pipeline slice, or one TP rank of either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stagemesh.config import ModelConfig, StageSpec
from stagemesh.model.attention import Attention, AttnMetadata
from stagemesh.model.families import TensorNames
from stagemesh.model.kv_cache import KVCache
from stagemesh.model.layers import GatedMLP, RMSNorm, Rope, RotaryEmbedding
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.moe import Experts, SparseMoE
from stagemesh.model.parallel import ParallelLMHead, TPGroup, VocabParallelEmbedding


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)) — the MLP dense or sparse per the config.

    A stage boundary may cut it in two (``StageSpec``): then it holds only its attention half
    or only its MLP half, and runs just that one.
    """

    def __init__(
        self, config: ModelConfig, layer: int, tp: TPGroup, experts: Experts | None, *, attention: bool = True, mlp: bool = True
    ):
        super().__init__()
        self.layer = layer
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if attention else None
        self.attn = Attention(config, tp) if attention else None
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if mlp else None
        self.mlp: SparseMoE | GatedMLP | None = None
        if mlp and config.is_moe_layer(layer):
            self.mlp = SparseMoE(config, layer, tp, experts)
        elif mlp:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, tp)

    def load(self, reader: CheckpointReader, names: TensorNames) -> None:
        i = self.layer
        if self.attn is not None:
            self.input_norm.load(reader, f"{names.input_norm.format(layer=i)}.weight")
            self.attn.load(reader, names.attention.format(layer=i), names.attention_proj)
        if self.mlp is not None:
            self.post_norm.load(reader, f"{names.post_norm.format(layer=i)}.weight")
            if isinstance(self.mlp, SparseMoE):
                self.mlp.load(reader)
            else:
                self.mlp.load(reader, names.mlp.format(layer=i), names.mlp_proj)

    def forward(self, x: torch.Tensor, meta: AttnMetadata, rope: Rope, kv_cache: torch.Tensor | None) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.input_norm(x), meta, rope, kv_cache)
        if self.mlp is not None:
            x = x + self.mlp(self.post_norm(x))
        return x


class StageModel(nn.Module):
    """The layers ``spec.layers`` of a model (+ embedding on the first stage, + head on the last)."""

    def __init__(self, config: ModelConfig, spec: StageSpec, tp: TPGroup = TPGroup(), experts: Experts | None = None):
        super().__init__()
        self.config, self.spec, self.tp = config, spec, tp
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp) if spec.is_first else None
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, tp, experts, attention=i in spec.attention_layers, mlp=i in spec.mlp_layers)
            for i in spec.layers
        )
        self.kv_index = [spec.attention_layers.index(i) if i in spec.attention_layers else None for i in spec.layers]
        """Each layer's index into the KV cache (only layers with attention have one)."""
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if spec.is_last else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp) if spec.is_last else None

    @property
    def num_kv_heads(self) -> int:
        return next(layer.attn for layer in self.layers if layer.attn is not None).num_kv_heads

    def load(self, reader: CheckpointReader, progress: Callable[[int, int], None] | None = None) -> None:
        """Read this stage's (and this rank's) tensors — and nothing else — from the checkpoint;
        ``progress(done, total)`` after each layer."""
        names = self.config.tensors
        embed, head = f"{names.embed}.weight", f"{names.lm_head}.weight"
        if self.embed is not None:
            self.embed.load(reader, embed)
        for done, layer in enumerate(self.layers, 1):
            layer.load(reader, names)
            if progress is not None:
                progress(done, len(self.layers))
        if self.norm is not None:
            self.norm.load(reader, f"{names.final_norm}.weight")
            tied = self.config.tie_word_embeddings or not reader.has(head)
            self.lm_head.load(reader, embed if tied else head)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, meta: AttnMetadata, cache: KVCache) -> torch.Tensor:
        """inputs: token ids [N] on the first stage, else hidden states [N, H]. Returns [N, H]."""
        x = self.embed(inputs) if self.embed is not None else inputs
        rope = self.rotary(meta.positions, x.dtype)
        for layer, kv in zip(self.layers, self.kv_index):
            x = layer(x, meta, rope, None if kv is None else cache.kv[kv])
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the rows to sample from: [B, H] → float32 [B, V]."""
        return self.lm_head(self.norm(hidden)).float()
