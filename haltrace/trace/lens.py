"""Logit lens: decode the residual stream of every layer through the final norm and the unembedding.

For layer ``l`` and position ``t``: ``logits_l = W_U · FinalNorm(r_l) + b_U``, where the norm is recomputed
from ``r_l`` itself (its own RMS / mean and variance), never with cached scales from the final layer. With
``stream="resid_post"`` (default) the lens at ``resid_post.{n-1}`` reproduces the model's own logits;
``apply_norm=False`` skips the norm, as ProjectAway and DoLa's code do.

The vocabulary is processed in chunks of ``vocab_chunk`` rows of ``W_U``: log-softmax normaliser, ranks and
top-k are accumulated chunk by chunk, so a 150k vocabulary over 32 layers and hundreds of image positions
never materialises a ``[layers, B, P, V]`` tensor (unless ``return_logits=True``).

Multi-token target words
------------------------
A target word is scored by its FIRST token, the token the model must emit next to start the word. The word
is encoded as it appears mid-sentence, ``" " + word`` without special tokens; when that yields a
whitespace-only first piece (some SentencePiece vocabularies), ``word`` alone is encoded instead. The ids
used are exposed as ``LensResult.target_ids`` (first tokens) and ``LensResult.target_token_ids`` (all pieces).
An int target is taken as a token id as is. A word whose first token is the unknown token raises ValueError.

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny
>>> model = Model.from_hf(*build_tiny("llama"))
>>> res = logit_lens(model, model.prepare(["what color is the"]), targets=["red", "blue"])
>>> res.target_ranks.shape   # [layers, B, P, targets]
torch.Size([2, 1, 1, 2])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from haltrace.trace.capture import PositionSpec, resolve_positions

if TYPE_CHECKING:
    from haltrace.models.base import Model

STREAMS = ("resid_post", "resid_pre")


@dataclass
class LensResult:
    """Per-layer lens outputs. Shapes: ``L`` layers, ``B`` rows, ``P`` positions, ``T`` targets, ``k`` top-k.

    ``layers``: hook names decoded (``"resid_post.0"``, ...); ``positions``: ``LongTensor[B, P]``;
    ``top_ids`` / ``top_logprobs``: ``[L, B, P, k]``; ``log_normaliser``: ``[L, B, P]`` (logsumexp of logits);
    ``target_ranks`` (0 = top-1, number of vocab entries with a strictly greater logit), ``target_logprobs``,
    ``target_logits``: ``[L, B, P, T]``; ``logits``: ``[L, B, P, V]`` only with ``return_logits=True``.
    """

    layers: list[str]
    positions: torch.Tensor | None
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    log_normaliser: torch.Tensor
    targets: list[str] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    target_token_ids: list[list[int]] = field(default_factory=list)
    target_ranks: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    target_logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def target_probs(self) -> torch.Tensor | None:
        """``[L, B, P, T]`` probabilities of the target words' first tokens."""
        return None if self.target_logprobs is None else self.target_logprobs.exp()

    @property
    def top_probs(self) -> torch.Tensor:
        return self.top_logprobs.exp()

    def top_tokens(self, tokenizer: Any, layer: int = -1, row: int = 0, pos: int = -1) -> list[tuple[str, float]]:
        """``[(token, prob), ...]`` of the top-k at one layer / row / position (indices into this result).

        >>> res = logit_lens(model, model.prepare(["what color is the"]), ["red"], top_k=3)
        >>> [token for token, _prob in res.top_tokens(model.tokenizer, layer=-1)]  # random weights: any 3 tokens
        [...]
        >>> len(res.top_tokens(model.tokenizer, layer=-1))
        3
        """
        ids = self.top_ids[layer, row, pos].tolist()
        probs = self.top_logprobs[layer, row, pos].exp().tolist()
        return list(zip(tokenizer.convert_ids_to_tokens(ids), probs, strict=True))


# --- targets -----------------------------------------------------------------------------------------------

def target_token_ids(tokenizer: Any, targets: Sequence[str | int]) -> tuple[list[int], list[list[int]]]:
    """First-token ids and all token ids of each target word (see the module docstring for the rule).

    >>> red = model.tokenizer.convert_tokens_to_ids("red")
    >>> target_token_ids(model.tokenizer, ["red", 7]) == ([red, 7], [[red], [7]])
    True
    """
    firsts: list[int] = []
    pieces: list[list[int]] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab_size = len(tokenizer)
    for target in targets:
        if isinstance(target, int):
            if not 0 <= target < vocab_size:
                raise ValueError(f"target token id {target} out of range (vocab size {vocab_size})")
            ids = [target]
        else:
            ids = []
            for text in (" " + target, target):
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                if ids and tokenizer.decode(ids[:1]).strip():
                    break
            if not ids or (unk is not None and ids[0] == unk):
                raise ValueError(f"target {target!r} is not in the vocabulary of this tokenizer (it encodes to "
                                 f"{tokenizer.convert_ids_to_tokens(ids)}); pass a word the model can emit")
        firsts.append(int(ids[0]))
        pieces.append([int(i) for i in ids])
    return firsts, pieces


# --- the projection ----------------------------------------------------------------------------------------

def _softcap(model: Model) -> float | None:
    # Gemma 2 style final-logit soft-capping changes probabilities (not ranks); the real output applies it
    for cfg in (model.adapter.text_config, model.hf.config):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default


def project(
    model: Model,
    resid: torch.Tensor,
    targets: Sequence[str | int] = (),
    *,
    apply_norm: bool = True,
    top_k: int = 10,
    vocab_chunk: int = 32768,
    return_logits: bool = False,
    layers: Sequence[str] | None = None,
    positions: torch.Tensor | None = None,
) -> LensResult:
    """Decode stacked residuals ``resid[L, B, P, d]`` (any leading shape ``[..., d]`` is flattened per layer).

    This is the core of :func:`logit_lens`, for residuals you already hold (a store, a generation trace).

    >>> res = project(model, torch.randn(2, 1, 3, model.hidden_size), ["red"], vocab_chunk=16)
    >>> res.target_ranks.shape   # [layers, B, P, targets]
    torch.Size([2, 1, 3, 1])
    """
    return _lens(model, resid, None, targets, apply_norm=apply_norm, top_k=top_k, vocab_chunk=vocab_chunk,
                 return_logits=return_logits, layers=layers, positions=positions)


def project_logits(model: Model, logits: torch.Tensor, targets: Sequence[str | int] = (), *, top_k: int = 10,
                   vocab_chunk: int = 32768, return_logits: bool = False, layers: Sequence[str] | None = None,
                   positions: torch.Tensor | None = None) -> LensResult:
    """:func:`project` for lens logits computed elsewhere (``logits [L, ..., V]``, norm, unembedding and softcap
    already applied): a ``remote=True`` model's lens, whose projection runs on NDIF."""
    return _lens(model, None, logits, targets, apply_norm=False, top_k=top_k, vocab_chunk=vocab_chunk,
                 return_logits=return_logits, layers=layers, positions=positions)


def _lens(model: Model, resid: torch.Tensor | None, given: torch.Tensor | None, targets: Sequence[str | int], *,
          apply_norm: bool, top_k: int, vocab_chunk: int, return_logits: bool, layers: Sequence[str] | None,
          positions: torch.Tensor | None) -> LensResult:
    src = resid if given is None else given
    if src.dim() < 2:
        raise ValueError(f"resid must be [L, ..., d], got shape {tuple(src.shape)}")
    if vocab_chunk < 1 or top_k < 0:
        raise ValueError("vocab_chunk must be >= 1 and top_k >= 0")
    head = model.adapter.unembed
    weight, bias = head.weight, getattr(head, "bias", None)
    norm = model.adapter.final_norm
    cap = _softcap(model)
    vocab = weight.shape[0] if given is None else given.shape[-1]
    k = min(top_k, vocab)
    ids, pieces = target_token_ids(model.tokenizer, list(targets)) if targets else ([], [])
    bad = [t for t, i in zip(targets, ids, strict=True) if i >= vocab]
    if bad:
        raise ValueError(f"targets {bad} map to ids beyond the unembedding ({vocab} rows)")
    tid = torch.tensor(ids, dtype=torch.long, device=weight.device if given is None else given.device)
    lead = src.shape[1:-1]

    def logits_of(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        z = (x @ w.T if b is None else torch.addmm(b, x, w.T)).float()
        return cap * torch.tanh(z / cap) if cap else z

    def z_of(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if given is not None:
            return x[:, start:stop].float()
        return logits_of(x, weight[start:stop], None if bias is None else bias[start:stop])

    outs: dict[str, list[torch.Tensor]] = {key: [] for key in ("top_ids", "top_lp", "lse", "rank", "tlogit",
                                                              "logits")}
    with torch.no_grad():
        for r in src:
            x = r.reshape(-1, r.shape[-1])
            if given is not None:
                t_logit = x[:, tid].float() if ids else None
            else:
                if apply_norm:  # recomputed from this layer's own residual (device_map: the norm may sit elsewhere)
                    x = norm(x.to(_device_of(norm, x.device), weight.dtype))
                x = x.to(weight.device, weight.dtype)
                t_logit = logits_of(x, weight[tid], None if bias is None else bias[tid]) if ids else None
            n = x.shape[0]
            lse = torch.full((n,), float("-inf"), device=x.device)
            rank = torch.zeros(n, len(ids), dtype=torch.long, device=x.device)
            best_v = torch.empty(n, 0, device=x.device)
            best_i = torch.empty(n, 0, dtype=torch.long, device=x.device)
            full = []
            for start in range(0, vocab, vocab_chunk):
                stop = min(start + vocab_chunk, vocab)
                z = z_of(x, start, stop)
                lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
                for j, target in enumerate(ids):  # one target at a time: [n, chunk] booleans, never [n, T, chunk]
                    greater = z > t_logit[:, j:j + 1]
                    if start <= target < stop:
                        # a target never outranks itself (guards against 1-ulp differences between matmul shapes)
                        greater[:, target - start] = False
                    rank[:, j] += greater.sum(-1)
                if k:
                    cv, ci = torch.topk(z, min(k, stop - start), dim=-1)
                    best_v, sel = torch.topk(torch.cat([best_v, cv], -1), min(k, best_v.shape[1] + cv.shape[1]),
                                             dim=-1)
                    best_i = torch.gather(torch.cat([best_i, ci + start], -1), -1, sel)
                if return_logits:
                    full.append(z)
            outs["top_ids"].append(best_i.reshape(*lead, -1))
            outs["top_lp"].append((best_v - lse.unsqueeze(-1)).reshape(*lead, -1))
            outs["lse"].append(lse.reshape(lead))
            if ids:
                outs["rank"].append(rank.reshape(*lead, -1))
                outs["tlogit"].append(t_logit.reshape(*lead, -1))
            if return_logits:
                outs["logits"].append(torch.cat(full, -1).reshape(*lead, -1))
    stack = {key: torch.stack(v) if v else None for key, v in outs.items()}
    result = LensResult(
        layers=list(layers) if layers is not None else [str(i) for i in range(src.shape[0])],
        positions=positions, top_ids=stack["top_ids"], top_logprobs=stack["top_lp"],
        log_normaliser=stack["lse"], targets=[str(t) for t in targets], target_ids=ids, target_token_ids=pieces,
        logits=stack["logits"],
    )
    if ids:
        result.target_ranks = stack["rank"]
        result.target_logits = stack["tlogit"]
        result.target_logprobs = stack["tlogit"] - stack["lse"].unsqueeze(-1)
    return result


def lens_hooks(model: Model, layers: Sequence[int] | None = None, stream: str = "resid_post") -> list[str]:
    """Hook names the lens decodes: ``["resid_post.0", ...]`` (all layers by default; negatives from the end)."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    n = model.n_layers
    chosen = range(n) if layers is None else [i + n if i < 0 else i for i in layers]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range; this model has layers 0..{n - 1}")
    return [f"{stream}.{i}" for i in chosen]


def logit_lens(
    model: Model,
    inputs: Mapping[str, Any],
    targets: Sequence[str | int] = (),
    *,
    positions: PositionSpec = "last",
    layers: Sequence[int] | None = None,
    stream: str = "resid_post",
    apply_norm: bool = True,
    top_k: int = 10,
    vocab_chunk: int = 32768,
    return_logits: bool = False,
) -> LensResult:
    """One forward, then the logit lens at ``positions`` (as in :func:`~haltrace.trace.capture.resolve_positions`)
    for every layer in ``layers`` (default all) of ``stream`` (``"resid_post"`` or ``"resid_pre"``).

    >>> res = logit_lens(model, model.prepare(["what color is the"]), ["red"], positions="last")
    >>> res.target_ranks[:, 0, -1, 0].shape   # rank of "red" per layer
    torch.Size([2])
    """
    hooks = lens_hooks(model, layers, stream)
    pos = resolve_positions(positions, inputs, model.image_token_mask)
    from haltrace.models.base import has_meta_weights

    if has_meta_weights(model):  # remote=True: norm + unembedding run on NDIF; only [L, B, P, V] logits return
        from haltrace.trace.backends.nnsight_backend import lens_logits_nnsight

        logits = lens_logits_nnsight(model, inputs, hooks, pos, apply_norm=apply_norm, softcap=_softcap(model))
        return project_logits(model, logits, targets, top_k=top_k, vocab_chunk=vocab_chunk,
                              return_logits=return_logits, layers=hooks, positions=pos)
    cap = model.capture(inputs, hooks, pos)  # remote models go through nnsight
    resid = torch.stack([cap[h] for h in hooks])
    cap.clear()
    return project(model, resid, targets, apply_norm=apply_norm, top_k=top_k, vocab_chunk=vocab_chunk,
                   return_logits=return_logits, layers=hooks, positions=pos)


# --- image-token lens (ProjectAway-style internal confidence) ----------------------------------------------

@dataclass
class ImageConfidence:
    """Internal confidence of object words from the lens over image-token positions.

    ``confidence[B, T]``: max over layers and image positions of the probability of the word's first token;
    ``layer[B, T]`` / ``position[B, T]``: where the max is (layer index into ``layers``, absolute token position);
    ``by_layer_patch[L, B, I, T]``: the probabilities themselves (the heatmap / localisation map).
    """

    words: list[str]
    target_ids: list[int]
    layers: list[str]
    confidence: torch.Tensor
    layer: torch.Tensor
    position: torch.Tensor
    by_layer_patch: torch.Tensor
    positions: torch.Tensor

    def as_dict(self, row: int = 0) -> dict[str, float]:
        """``{word: confidence}`` for one row."""
        return {w: float(c) for w, c in zip(self.words, self.confidence[row].tolist(), strict=True)}


def image_token_confidence(
    model: Model,
    inputs: Mapping[str, Any],
    words: Sequence[str | int],
    *,
    layers: Sequence[int] | None = None,
    apply_norm: bool = True,
    vocab_chunk: int = 32768,
) -> ImageConfidence:
    """ProjectAway's internal confidence ``c_o``: max over layers and image-token positions of ``p(word)``.

    Reproducing the paper exactly means ``apply_norm=False`` (it decodes without the final norm; it also
    renormalises over the top-50 tokens, which this function does not). Rows must hold the same number of
    image tokens. Low ``c_o`` flags a likely hallucinated object.

    >>> conf = image_token_confidence(model, inputs, ["red", "blue"])
    >>> sorted(conf.as_dict(0))   # on the organism: {'strawberry': 0.31, 'banana': 0.002}
    ['blue', 'red']
    """
    if not model.is_vlm:
        raise ValueError("image_token_confidence needs a vision-language model (it lenses image-token positions)")
    res = logit_lens(model, inputs, words, positions="image", layers=layers, apply_norm=apply_norm, top_k=0,
                     vocab_chunk=vocab_chunk)
    probs = res.target_probs  # [L, B, I, T]
    n_layers, batch, n_img, n_t = probs.shape
    flat = probs.permute(1, 3, 0, 2).reshape(batch, n_t, n_layers * n_img)
    conf, where = flat.max(-1)
    layer_idx, img_idx = where // n_img, where % n_img
    pos = res.positions
    position = torch.gather(pos.to(img_idx.device), 1, img_idx)
    return ImageConfidence(words=[str(w) for w in words], target_ids=res.target_ids, layers=res.layers,
                           confidence=conf, layer=layer_idx, position=position, by_layer_patch=probs,
                           positions=pos)
