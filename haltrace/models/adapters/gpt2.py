"""GPT-2: ``transformer.h[i].attn.c_proj`` (a Conv1D) is the output projection; ``ln_f`` the final norm.

>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> from haltrace.models.adapters import adapter_for
>>> adapter = adapter_for(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)))
>>> adapter.n_layers, type(adapter.o_proj(0)).__name__, adapter.absolute_positions
(2, 'Conv1D', True)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from haltrace.models.adapters.base import Adapter, register_adapter


@register_adapter("gpt2")
class GPT2Adapter(Adapter):
    """Note ``embed`` is the token embedding ``wte`` only; ``resid_pre.0`` also includes the positions ``wpe``."""

    family = "gpt2"
    absolute_positions = True

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.hf, "transformer", self.hf)

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.decoder.h

    @property
    def embed(self) -> nn.Module:
        return self.decoder.wte

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.ln_f

    def attention(self, i: int) -> nn.Module:
        return self.layers[i].attn

    def o_proj(self, i: int) -> nn.Module:
        return self.attention(i).c_proj

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp

    @property
    def hidden_size(self) -> int:
        return int(self.config.n_embd)

    @property
    def n_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads
