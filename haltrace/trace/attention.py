"""Attention-to-image ratio: how much of a query's softmax attention lands on image-token keys, per layer and head.

``AIR_{l,h}(q) = sum_{j in image tokens} softmax(Q_q K^T / sqrt(d_h))_{h, j}`` (``methods-vlm.md`` §7). The
ratio is computed inside the attention hooks, so the full ``[B, H, T, T]`` pattern is never kept.

Needs eager attention: sdpa / flash kernels return no weights. Load with
``haltrace.load(..., attn_implementation="eager")``.

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny, build_tiny_inputs
>>> model = Model.from_hf(*build_tiny("llava"))
>>> air = attention_to_image(model, build_tiny_inputs("llava", model.processor))
>>> air.ratio.shape   # [B, P, n_layers, n_heads], P = 1 for the last prompt token
torch.Size([2, 1, 2, 4])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from haltrace.trace.capture import PositionSpec, resolve_positions, temporary_hooks

if TYPE_CHECKING:
    from haltrace.models.base import Model

EAGER_HINT = 'load it with haltrace.load(..., attn_implementation="eager")'


def require_eager(model: Model) -> None:
    """Raise ValueError unless ``model`` runs eager attention (the only kernel that returns weights)."""
    impl = model.adapter.attn_implementation
    if impl != "eager":
        raise ValueError(f"attention-to-image needs attention weights, but this model runs {impl!r} attention, "
                         f"which returns none; {EAGER_HINT}")


def _layer_list(model: Model, layers: Sequence[int] | None) -> list[int]:
    n = model.n_layers
    chosen = list(range(n)) if layers is None else [i + n if i < 0 else i for i in layers]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range; this model has layers 0..{n - 1}")
    return chosen


class ImageAttentionRecorder:
    """Forward hooks on attention modules that record, per forward, the image-attention mass ``[B, P, H]``.

    ``image_mask[B, T0]`` marks image tokens of the prompt. Keys are mapped to absolute positions by right
    alignment: a forward that brings ``q`` new tokens after ``seen`` cached ones has its last key at absolute
    position ``seen + q - 1`` (also right for sliding-window caches that keep only the newest keys). Query rows:
    ``positions[B, P]`` (absolute, single forward over the whole prompt) or, when ``None``, the last row.
    ``records[layer]`` holds one ``[B, P, H]`` tensor per forward.
    """

    def __init__(self, model: Model, image_mask: torch.Tensor, layers: Sequence[int] | None = None,
                 positions: torch.Tensor | None = None):
        require_eager(model)
        self.model = model
        self.layers = _layer_list(model, layers)
        self.image_mask = image_mask.bool()
        self.positions = positions
        self.seen = {i: 0 for i in self.layers}
        self.records: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}

    def _key_mask(self, total: int, n_keys: int) -> torch.Tensor:
        mask = self.image_mask
        if mask.shape[1] < total:  # generated tokens are never image tokens
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], total - mask.shape[1])], dim=1)
        return mask[:, total - n_keys:total]

    def hook(self, layer: int) -> Any:
        def fn(_module: Any, _args: Any, _kwargs: Any, out: Any) -> None:
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise RuntimeError(f"attention layer {layer} returned no weights; {EAGER_HINT}")
            n_q, n_k = weights.shape[-2], weights.shape[-1]
            total = self.seen[layer] + n_q
            self.seen[layer] = total
            keys = self._key_mask(total, n_k).to(weights.device, torch.float32)  # [B, K]
            if self.positions is None:
                rows = weights[:, :, -1:, :]
            else:
                if n_q != total:
                    raise RuntimeError("explicit query positions need a single forward over the whole prompt")
                index = self.positions.to(weights.device)[:, None, :, None].expand(-1, weights.shape[1], -1, n_k)
                rows = torch.gather(weights, 2, index)
            mass = torch.einsum("bhpk,bk->bph", rows.detach().float(), keys)
            self.records[layer].append(mass)
        return fn

    @contextmanager
    def attached(self) -> Iterator[ImageAttentionRecorder]:
        """Register the hooks for the body of the ``with``; always removed afterwards."""
        adapter = self.model.adapter
        with temporary_hooks([(adapter.attention(i), self.hook(i)) for i in self.layers], with_kwargs=True):
            yield self

    def stacked(self) -> torch.Tensor:
        """``[B, n_forwards * P, L, H]``: forwards concatenated along the position axis."""
        per_layer = [torch.cat(self.records[i], dim=1) for i in self.layers]
        return torch.stack(per_layer, dim=2)


@dataclass
class ImageAttention:
    """``ratio[B, P, L, H]``: attention mass on image tokens; ``layers``: the block indices of ``L``;
    ``positions[B, P]``: query positions; ``n_image[B]`` / ``n_keys[B, P]``: for the uniform baseline."""

    ratio: torch.Tensor
    layers: list[int]
    positions: torch.Tensor
    n_image: torch.Tensor
    n_keys: torch.Tensor

    @property
    def per_layer(self) -> torch.Tensor:
        """``[B, P, L]``: mean over heads (PvP's ``img_mass_l``)."""
        return self.ratio.mean(-1)

    @property
    def baseline(self) -> torch.Tensor:
        """``[B, P]``: the ratio a uniform attention row would give, ``n_image / n_keys``."""
        return self.n_image[:, None].float() / self.n_keys.float()


def attention_to_image(
    model: Model,
    inputs: Mapping[str, Any],
    positions: PositionSpec = "last",
    *,
    layers: Sequence[int] | None = None,
) -> ImageAttention:
    """One eager forward; per query position, layer and head the attention mass on image-token keys.

    ``positions`` as in :func:`~haltrace.trace.capture.resolve_positions` (default: the last prompt token).

    >>> air = attention_to_image(model, inputs)
    >>> air.per_layer[0, 0].shape  # row 0, last token: mean over heads, per layer
    torch.Size([2])
    """
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError("attention_to_image needs input_ids (to find the image tokens)")
    image_mask = model.image_token_mask(ids)
    if not bool(image_mask.any()):
        raise ValueError("no image tokens in input_ids: attention-to-image needs a VLM prompt with an image")
    pos = resolve_positions(positions, inputs, model.image_token_mask)
    if pos is None:
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    from haltrace.models.base import has_meta_weights

    if has_meta_weights(model):  # remote=True: the eager forward runs on NDIF; the query rows come back
        from haltrace.trace.backends.nnsight_backend import capture_nnsight

        require_eager(model)
        picked = _layer_list(model, layers)
        cap = capture_nnsight(model, inputs, [f"attn_pattern.{i}" for i in picked], pos, output=False)
        keys = image_mask.to(torch.float32)
        ratio = torch.stack([torch.einsum("bhpk,bk->bph", cap[f"attn_pattern.{i}"].float().cpu(), keys.cpu())
                             for i in picked], dim=2)
    else:
        recorder = ImageAttentionRecorder(model, image_mask, layers, positions=pos)
        with recorder.attached(), torch.no_grad():
            model.hf(**inputs)
        picked, ratio = recorder.layers, recorder.stacked()
    mask = inputs.get("attention_mask")
    valid = (mask if mask is not None else torch.ones_like(ids)).bool()
    # keys a causal row at position p may see: non-pad tokens at positions <= p
    n_keys = torch.stack([(valid[b, :] & (torch.arange(ids.shape[1], device=ids.device) <= p[:, None])).sum(-1)
                          for b, p in enumerate(pos)])
    return ImageAttention(ratio=ratio, layers=picked, positions=pos,
                          n_image=image_mask.sum(-1), n_keys=n_keys)
