"""Knowledge erasure / ProjectAway (Jiang, Kachinthaya, Petryk, Gandelsman, "Interpreting and Editing
Vision-Language Representations to Mitigate Hallucinations", arXiv 2410.02762, ICLR 2025; official code
``nickjiang2378/vl-interp``).

For every new prompt with an image, two passes, as the official pipeline (captions with their detections, then
``experiment13A``'s edited regeneration):

1. **Caption, then detect** (:meth:`ProjectAwayEdit.prepare`, engine hooks paused): the model first answers the
   prompt itself, greedily, up to ``caption_tokens`` new tokens (:func:`first_pass`); the objects that answer
   *mentions* (:func:`mentions`, words of ``objects``) are the candidates. Each candidate's internal confidence
   ``c_o`` (:func:`internal_confidence`) is the max over its sub-tokens, every ``hidden_states`` layer and
   every image position of the logit-lens probability renormalised over the top 50 tokens; ``c_o <
   threshold`` flags it as hallucinated.
2. **Erase, then regenerate** (:meth:`ProjectAwayEdit.edit_at`): in the real forward (the prefill of
   ``generate``, or a plain forward), at the output of decoder block ``l_I`` (``resid_post.l_I``), for each
   image token ``h_i`` and each flagged object's text representation ``t`` in turn, ``p = <h_i, t> / <t, t>``;
   if ``p > 0``: ``h_i <- h_i - w * p * t`` (:func:`erase`). Decoding steps are untouched: the image tokens'
   keys and values are cached from the edited prefill.

Text representation ``t`` (``text_rep``, :func:`text_representations`): ``"resid_post.k"`` is the official
hidden-layer embedding, the state of ``<bos> word`` (no image) at its last sub-token at ``hidden_states[l_T]``
with ``l_T = k + 1`` (``"resid_pre.0"`` is ``l_T = 0``); ``"embed"`` is the mean input embedding of the word's
sub-tokens (the official ``get_phrase_embedding``, "layer -1"); ``"unembed"`` (the word's unembedding row) is a
haltrace extra, not in the paper. The edit layer ``resid_post.l`` is the paper's ``l_I = l`` (a forward hook on
``layers[l_I]``) == HF ``hidden_states[l+1]``.

Choices made on the fit data (never the evaluation sets), unless given: the threshold maximising the balanced
accuracy of "``c_o`` < threshold => hallucinated" over the objects the fit captions mention; then, as the
official sweeps, ``(edit_layer, text_rep)`` over a grid at ``w = 1`` and ``weight`` over ``weights`` (0.5 to 15,
the paper's ablation range) at the chosen cell, each by the lowest fit CHAIR_i whose recall drops by at most
``max_recall_drop``. ``preset="paper"`` takes the published LLaVA-1.5 cell instead (:data:`PAPER_LLAVA`, scaled
to the model's depth).

Fidelity (paper / official code step -> haltrace -> same or different):

=================================================  ============================  =====================================
caption the image, then detect among the           ``ProjectAwayEdit.prepare``   same two passes; pass 1 answers the
caption's objects (``pred_hallucination``)         (:func:`first_pass`)          current prompt greedily (official:
                                                                                 beam 5, 512 tokens; the length is
                                                                                 ``caption_tokens``)
caption words -> objects (CHAIR synonyms)          :func:`mentions`              exact word / n-gram match against
                                                                                 ``objects`` (no synonym table or
                                                                                 singularisation: steering may not
                                                                                 import haltrace.evals)
``c_o``: lm_head on every hidden state (no final   :func:`internal_confidence`   same (``lens_norm=True``: the norm on
norm; HF's last state is normed), top-50                                         every layer instead)
renormalised, max over sub-tokens, layers,
image positions
threshold on ``c_o`` (``--threshold``)             ``fit``                       chosen on the fit captions by balanced
                                                                                 accuracy (the paper's value was not
                                                                                 recovered)
text embedding: ``<bos> word`` at layer ``l_T``,   :func:`text_representations`  same; ``unembed`` is a haltrace extra
or mean input embedding (``l_T = -1``)
hook on ``layers[l_I]``, prefill only, image       ``ProjectAwayEdit.edit_at``   same; image positions from the token
positions 35..-12                                                                ids, not hard-coded offsets
sequential positive-projection removal, weight w   :func:`erase`                 same
``(l_I, l_T)`` sweep at w = 1, weight ablation     ``fit`` (grid)                same protocol on the fit data, scored
                                                                                 by CHAIR_i with a recall guard
LLaVA-1.5 cell (l_I 9, l_T 17, w 1)                ``fit(preset="paper")``       same cell at the same relative depth;
                                                                                 it is the official sweep's recorded
                                                                                 cell (-24.7% hallucinations, recall
                                                                                 kept): the paper's text does not
                                                                                 print its Table-2 cell
=================================================  ============================  =====================================

>>> from haltrace.steering.registry import get_method
>>> fitted = get_method("erasure").fit(model)                    # doctest: +SKIP
>>> with fitted.apply(model):                                      # doctest: +SKIP
...     model.hf.generate(**inputs, max_new_tokens=64)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from haltrace.conventions import HookPoint
from haltrace.data.images import open_image
from haltrace.data.items import CaptionItem, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.errors import InputError
from haltrace.metrics import auroc_score
from haltrace.steering.context import NOT_FORWARDED_KEYS, image_forward_inputs
from haltrace.steering.fitdata import (
    PVP_FIT_SEED,
    item_prompts,
    items_fingerprint,
    last_token_states,
    layer_record,
    require_vlm,
)
from haltrace.steering.interventions import Intervention, Phase, PositionRule, register_state_type
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.trace.capture import resolve_positions
from haltrace.trace.lens import project, target_token_ids

# the prompt's inputs for an extra forward live in the engine's context; kept importable from here
__all__ = ["NOT_FORWARDED_KEYS", "ProjectAway", "ProjectAwayEdit", "erase", "first_pass", "image_forward_inputs",
           "internal_confidence", "mentions", "text_representations"]

PAPER = ("Jiang, Kachinthaya, Petryk, Gandelsman, 'Interpreting and Editing Vision-Language Representations "
         "to Mitigate Hallucinations', arXiv 2410.02762 (ICLR 2025); code nickjiang2378/vl-interp@5cd5a3c")
#: the published LLaVA-1.5-7B cell (32 decoder layers): edit at ``layers[9]``'s output with the text embedding
#: of ``hidden_states[17]``, weight 1 (the official LLaVA sweep cell whose recorded result, hallucinations
#: -24.7% with recall kept, matches the paper's -23.8%); other depths take the same relative depth
PAPER_LLAVA = {"edit_layer": 9, "text_layer": 17, "weight": 1.0, "n_layers": 32}
#: the official logit lens keeps the top 50 tokens (``TopKLogitsWarper(top_k=50)``) before its softmax
PAPER_TOP_K = 50
#: the official captions: ``generate(num_beams=5, max_new_tokens=512)``
PAPER_CAPTION_TOKENS = 512
#: the weight grid: the paper's weight ablation spans 0.5 .. 15
DEFAULT_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
CANDIDATES = ("mentioned", "all")
PRESETS = ("paper",)


# --------------------------------------------------------------------------------------- pieces

def erase(h: torch.Tensor, directions: torch.Tensor, weight: float) -> torch.Tensor:
    """ProjectAway on rows ``h [n, d]``: for each direction in order, remove ``weight`` x its positive
    projection (the paper's sequential rule, not a joint orthogonal projection).

    >>> h = erase(torch.randn(5, 4), torch.randn(2, 4), 1.0)
    >>> h.shape
    torch.Size([5, 4])
    """
    for t in directions:
        t = t.to(h.dtype)
        p = (h @ t) / (t @ t)
        h = h - weight * p.clamp_min(0.0)[:, None] * t
    return h


def check_text_rep(text_rep: str, n_layers: int) -> str:
    """``text_rep`` if valid for a model of ``n_layers`` blocks, else :class:`InputError` naming the choices."""
    choices = ("'embed', 'unembed', 'resid_pre.0' or 'resid_post.<k>' with k in 0.."
               f"{n_layers - 1} (the official hidden-layer text embedding at l_T = k + 1)")
    if text_rep in ("embed", "unembed", "resid_pre.0"):
        return text_rep
    kind, _, index = str(text_rep).partition(".")
    if kind == "resid_post" and index.isdigit() and int(index) < n_layers:
        return text_rep
    raise InputError(f"text_rep must be {choices}, got {text_rep!r}")


def paper_text_layer(text_rep: str) -> str:
    """The paper's ``l_T`` for a haltrace ``text_rep``.

    >>> paper_text_layer("resid_post.16"), paper_text_layer("embed")
    ('l_T = 17 (hidden_states index)', 'l_T = -1 (mean input embedding)')
    """
    if text_rep == "embed":
        return "l_T = -1 (mean input embedding)"
    if text_rep == "unembed":
        return "not in the paper (the word's unembedding row)"
    if text_rep == "resid_pre.0":
        return "l_T = 0 (hidden_states index)"
    return f"l_T = {int(text_rep.split('.')[1]) + 1} (hidden_states index)"


@torch.no_grad()
def text_representations(model: Any, words: Sequence[str], text_rep: str = "resid_post.0") -> torch.Tensor:
    """``[K, d]`` text representation of each word (see the module docstring for the variants)."""
    text_rep = check_text_rep(text_rep, model.n_layers)
    if text_rep in ("unembed", "embed"):
        _, pieces = target_token_ids(model.tokenizer, list(words))
        weight = (model.adapter.unembed if text_rep == "unembed" else model.adapter.embed).weight
        if text_rep == "unembed":  # the lens direction of the word's first token (the token it must emit)
            return torch.stack([weight[p[0]].float().cpu() for p in pieces])
        return torch.stack([weight[p].float().mean(0).cpu() for p in pieces])
    # "<bos> word" (the tokenizer's own special tokens), the state of its last sub-token
    return last_token_states(model, list(words), None, hooks=[text_rep])[:, 0]


def mentions(text: str, objects: Sequence[str]) -> list[str]:
    """Objects of ``objects`` that ``text`` mentions, in order, repeats kept: lower-cased words (punctuation
    dropped) matched exactly, longer names first ("dining table" before "table").

    >>> mentions("A fork, a knife and a dining table.", ["fork", "knife", "table", "dining table"])
    ['fork', 'knife', 'dining table']
    """
    names = {" ".join(str(o).lower().split()): str(o) for o in objects}
    longest = max((len(n.split()) for n in names), default=1)
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()
    out, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + n])
            if phrase in names:
                out.append(names[phrase])
                i += n
                break
        else:
            i += 1
    return out


def chair_tally(captions: Sequence[str], truths: Sequence[set[str]], objects: Sequence[str]) -> dict[str, float]:
    """CHAIR_i / CHAIR_s / recall / mean length of ``captions`` against ground-truth sets, mentions by
    :func:`mentions` (the same tally as :func:`haltrace.data.chair.chair_metrics` with no synonym table)."""
    mentioned = hallucinated = with_hallucination = covered = truth_total = words = 0
    for caption, truth in zip(captions, truths, strict=True):
        found = mentions(caption, objects)
        bad = [o for o in found if o not in truth]
        mentioned += len(found)
        hallucinated += len(bad)
        with_hallucination += bool(bad)
        covered += len(set(truth) & set(found))
        truth_total += len(truth)
        words += len(caption.split())
    return {"chair_i": hallucinated / mentioned if mentioned else 0.0,
            "chair_s": with_hallucination / len(captions) if captions else 0.0,
            "recall": covered / truth_total if truth_total else 0.0,
            "mean_length": words / len(captions) if captions else 0.0}


@torch.no_grad()
def internal_confidence(model: Any, inputs: dict[str, Any], words: Sequence[str], *, lens_norm: bool = False,
                        top_k: int | None = PAPER_TOP_K) -> torch.Tensor:
    """``[B, K]`` internal confidence ``c_o`` of each word, the official recipe: ``lm_head`` applied to every
    ``hidden_states`` entry of the prompt's forward (the embeddings and each block output without the final
    norm, the last entry with it, as HF returns it), log-softmax, keep the ``top_k`` tokens, softmax (a word
    outside the top ``top_k`` gets 0), then the max over the word's sub-tokens, the layers and the image
    positions. ``lens_norm=True`` applies the final norm to every layer; ``top_k=None`` skips the truncation.
    Rows must hold the same number of image tokens."""
    if not words:
        raise InputError("internal_confidence needs at least one word")
    n = model.n_layers
    hooks = ["resid_pre.0"] + [f"resid_post.{i}" for i in range(n)]
    pos = resolve_positions("image", inputs, model.image_token_mask)
    cap = model.capture(inputs, hooks, pos)  # remote models go through nnsight
    resid = torch.stack([cap[h] for h in hooks])  # [n+1, B, P, d]
    cap.clear()
    _, pieces = target_token_ids(model.tokenizer, list(words))
    ids = sorted({i for p in pieces for i in p})
    k = int(top_k or 0)
    parts = ([(resid, True)] if lens_norm else [(resid[:-1], False), (resid[-1:], True)])
    probs = []
    for stack, norm in parts:
        res = project(model, stack, ids, apply_norm=norm, top_k=k)
        lp = res.target_logprobs  # [L, B, P, ids]
        if k:
            lp = lp - torch.logsumexp(res.top_logprobs, dim=-1, keepdim=True)
            lp = lp.masked_fill(res.target_ranks >= k, float("-inf"))
        probs.append(lp.exp())
    per_id = torch.cat(probs).amax(dim=(0, 2))  # [B, ids]
    column = {i: j for j, i in enumerate(ids)}
    return torch.stack([per_id[:, [column[i] for i in p]].amax(-1) for p in pieces], dim=-1).float().cpu()


def _left_padded(inputs: dict[str, Any]) -> dict[str, Any]:
    """Right-padded rows moved to left padding (``generate`` continues after the last column): every
    ``[B, T]`` tensor of the prompt is rolled per row; position ids are dropped (``generate`` recomputes them)."""
    inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    if isinstance(inputs.get("mm_encoder_outputs"), dict):
        inputs["mm_encoder_outputs"] = dict(inputs["mm_encoder_outputs"])
    mask = inputs.get("attention_mask")
    if mask is None:  # generate() drops an all-ones mask before its forward: give it back (no padding)
        ids = inputs["input_ids"]
        inputs["attention_mask"] = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        return inputs
    if mask.dim() != 2 or bool(mask[:, -1].all()):
        return inputs
    batch, length = mask.shape
    trailing = torch.flip(mask.long(), dims=[1]).argmax(dim=1).tolist()  # pad columns after each row's last token
    for key, value in list(inputs.items()):  # ids, mask, token-type ids: every integer [B, T] tensor
        if (isinstance(value, torch.Tensor) and tuple(value.shape) == (batch, length)
                and not value.is_floating_point()):
            inputs[key] = torch.stack([torch.roll(value[b], s, dims=0) for b, s in enumerate(trailing)])
    return inputs


@torch.no_grad()
def first_pass(model: Any, inputs: dict[str, Any], max_new_tokens: int, *, num_beams: int = 1) -> list[str]:
    """ProjectAway's pass 1: the model's own greedy answer to each prompt row (``max_new_tokens`` at most,
    stopping at the end-of-sequence token), decoded without special tokens."""
    tok = model.tokenizer
    inputs = _left_padded(inputs)
    config = getattr(model.hf, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if getattr(tok, "eos_token_id", None) is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    pad = eos[0] if eos else (tok.pad_token_id if tok.pad_token_id is not None else 0)
    out = model.hf.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=num_beams,
                            eos_token_id=eos or None, pad_token_id=pad)
    start, stop = inputs["input_ids"].shape[1], set(eos)
    answers = []
    for row in out[:, start:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        answers.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def _inputs_key(inputs: dict[str, Any]) -> str:
    """A digest of the prompt's tensors (the fit's grid shares pass 1 between cells through it)."""
    digest = hashlib.sha1()

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}{tuple(value.shape)}".encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
        elif isinstance(value, dict):  # mm_encoder_outputs (ModelOutputs are dicts too)
            for key in sorted(value):
                add(f"{name}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{name}.{i}", v)

    for key in sorted(inputs):
        add(key, inputs[key])
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- the intervention

@register_state_type
@dataclass
class ProjectAwayEdit(Intervention):
    """ProjectAway at one residual site: per new prompt (:meth:`prepare`, the engine's hooks paused) pass 1
    captions and detects; in the prompt's own forward, the flagged objects' ``directions`` are erased from each
    row's image tokens (:func:`erase`). ``candidates="mentioned"`` (the paper) flags only objects the row's
    first-pass answer mentions; ``"all"`` flags every object of ``objects`` with low ``c_o`` without a first
    pass (haltrace's earlier variant, not the paper's).

    Runtime only: ``log`` (the erased words of every row, per prompt), ``captions`` (pass-1 answers),
    ``stats`` (prompts, rows, mentioned and erased counts).

    >>> edit = ProjectAwayEdit("resid_post.1", torch.randn(2, 8), objects=["cup", "fork"], threshold=0.1)
    >>> edit.positions, edit.phase
    ('image', 'prompt')
    """

    directions: torch.Tensor = field(default=None)  # type: ignore[assignment]
    objects: Sequence[str] = ()
    threshold: float = 0.0
    weight: float = 1.0
    lens_norm: bool = False
    top_k: int | None = PAPER_TOP_K
    candidates: str = "mentioned"
    caption_tokens: int = PAPER_CAPTION_TOKENS
    positions: PositionRule = field(default="image", kw_only=True)
    phase: Phase = field(default="prompt", kw_only=True)
    log: list = field(default_factory=list, init=False, repr=False)
    captions: list = field(default_factory=list, init=False, repr=False)
    stats: dict = field(default_factory=dict, init=False, repr=False)
    #: pass-1 results by prompt digest; the fit's grid shares one dict between its cells (None: no caching)
    cache: dict | None = field(default=None, init=False, repr=False)
    _select: torch.Tensor | None = field(default=None, init=False, repr=False)
    prepares: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.directions is None:
            raise ValueError("ProjectAwayEdit needs directions (one text representation per object)")
        self.directions = torch.as_tensor(self.directions, dtype=torch.float32).detach().clone()
        if not bool(torch.isfinite(self.directions).all()):
            raise ValueError("the erasure directions contain NaN or inf (from a damaged saved fit? refit ProjectAway)")
        self.objects = [str(o) for o in self.objects]
        for name in ("threshold", "weight"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
            setattr(self, name, value)
        if self.candidates not in CANDIDATES:
            raise InputError(f"candidates must be one of {', '.join(map(repr, CANDIDATES))}, got {self.candidates!r}")
        if int(self.caption_tokens) < 1:
            raise InputError(f"caption_tokens must be >= 1 (the first pass's length), got {self.caption_tokens}")
        if self.top_k is not None and int(self.top_k) < 0:
            raise InputError(f"top_k must be >= 0 or None, got {self.top_k}")
        self.lens_norm, self.caption_tokens = bool(self.lens_norm), int(self.caption_tokens)
        self.top_k = None if self.top_k is None else int(self.top_k)
        self.reset()

    def reset(self) -> None:
        """Clear the runtime record (``log``, ``captions``, ``stats``)."""
        self.log.clear()
        self.captions.clear()
        self.stats.clear()
        self.stats.update({"prompts": 0, "rows": 0, "mentioned": 0, "erased": 0})

    def validate(self, model: Any) -> HookPoint:
        point = super().validate(model)
        if point.kind not in ("resid_post", "resid_pre"):
            raise ValueError(f"ProjectAway edits the residual stream (resid_post.<layer>), not {point.name!r}")
        if self.directions.shape != (len(self.objects), model.hidden_size):
            raise ValueError(f"erasure directions are {tuple(self.directions.shape)} but need one row of the model's "
                             f"hidden size per object: ({len(self.objects)}, {model.hidden_size})")
        return point

    def detect(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """``([B, K] bool flags, pass-1 answers)`` for a prompt's model inputs (no hooks of ours involved)."""
        conf = internal_confidence(model, inputs, self.objects, lens_norm=self.lens_norm, top_k=self.top_k)
        if self.candidates == "all":
            return conf < self.threshold, [""] * conf.shape[0]
        answers = first_pass(model, inputs, self.caption_tokens)
        said = torch.tensor([[o in set(mentions(a, self.objects)) for o in self.objects] for a in answers],
                            dtype=torch.bool)
        return said & (conf < self.threshold), answers

    def prepare(self, model: Any, ctx: Any) -> None:
        self._select = None
        if ctx.ids is None or ctx.image is None or not bool(ctx.image.any()):
            return  # a text-only prompt: nothing to erase
        inputs = ctx.prompt_inputs()
        key = _inputs_key(inputs) if self.cache is not None else None
        if key is not None and key in self.cache:
            select, answers = self.cache[key]
        else:
            select, answers = self.detect(model, inputs)
            if key is not None:
                self.cache[key] = (select, answers)
        self._select = select.cpu()
        self.captions.extend(answers)
        self.log.extend([w for w, s in zip(self.objects, row, strict=True) if s] for row in self._select.tolist())
        self.stats["prompts"] += 1
        self.stats["rows"] += int(select.shape[0])
        self.stats["erased"] += int(select.sum())
        if self.candidates == "mentioned":
            self.stats["mentioned"] += sum(len(set(mentions(a, self.objects))) for a in answers)

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        select = self._select
        if select is None or mask is None or select.shape[0] != x.shape[0] or not bool(select.any()):
            return x
        x = x.clone()
        image = mask[..., 0].bool()
        for b in range(x.shape[0]):
            ks = select[b].nonzero()[:, 0]
            if len(ks):
                rows = image[b]
                x[b, rows] = erase(x[b, rows], self.directions[ks].to(x.device), self.weight)
        return x

    def describe(self) -> str:
        return f"ProjectAwayEdit({self.hook}, {len(self.objects)} objects, w={self.weight})"


# --------------------------------------------------------------------------------------- fit data / scoring

@torch.no_grad()
def captions(model: Any, images: Sequence[Any], prompt: str, *, max_new_tokens: int = PAPER_CAPTION_TOKENS,
             batch_size: int = 64) -> list[str]:
    """Greedy captions of ``images`` under ``prompt`` (stopping at the end-of-sequence token)."""
    out = []
    for s in range(0, len(images), batch_size):
        chunk = [open_image(im) for im in images[s:s + batch_size]]
        out += first_pass(model, model.prepare([prompt] * len(chunk), chunk), max_new_tokens)
    return out


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC of ``scores`` for ``labels`` (1 = present); None without both classes (JSON has no NaN)."""
    value = auroc_score(scores, labels)
    return value if math.isfinite(value) else None


def choose_threshold(conf: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """Threshold maximising balanced accuracy of ``conf < threshold`` => absent; returns (threshold, bacc)."""
    values = np.unique(conf)
    cands = np.concatenate([[values[0] * 0.5], (values[1:] + values[:-1]) / 2, [values[-1] * 2 + 1e-9]])
    best = (float(cands[0]), -1.0)
    for c in cands:
        flag = conf < c
        tpr = flag[present == 0].mean() if (present == 0).any() else 0.0
        tnr = (~flag[present == 1]).mean() if (present == 1).any() else 0.0
        bacc = 0.5 * (tpr + tnr)
        if bacc > best[1] + 1e-12:
            best = (float(c), float(bacc))
    return best


def paper_cell(n_layers: int) -> dict[str, Any]:
    """The published LLaVA-1.5 cell (:data:`PAPER_LLAVA`) at the same relative depth of an ``n_layers`` model:
    block ``round(l / 32 * n)`` for the edit layer (``l_I = 9``) and for the text layer's block (``l_T = 17`` =
    the output of block 16).

    >>> paper_cell(32)["edit_layer"], paper_cell(32)["text_rep"], paper_cell(4)["edit_layer"], paper_cell(4)["text_rep"]
    (9, 'resid_post.16', 1, 'resid_post.2')
    """
    ref = PAPER_LLAVA["n_layers"]
    edit = min(n_layers - 2, round(PAPER_LLAVA["edit_layer"] / ref * n_layers)) if n_layers > 1 else 0
    text = min(n_layers - 1, round((PAPER_LLAVA["text_layer"] - 1) / ref * n_layers))
    return {"edit_layer": max(edit, 0), "text_rep": f"resid_post.{max(text, 0)}", "weight": PAPER_LLAVA["weight"]}


# --------------------------------------------------------------------------------------- the method

def default_grid_layers(n: int, most: int = 8) -> list[int]:
    """``0 .. n-1`` when ``n <= most`` (the organism: every layer); else ``most`` evenly spaced layers, first and
    last included, so the default search stays a few dozen caption passes on a 32-layer model instead of ~1,000
    (the official sweep is also coarse; pass ``edit_layers=`` / ``text_reps=`` for a finer one).

    >>> default_grid_layers(3), default_grid_layers(32)
    ([0, 1, 2], [0, 4, 9, 13, 18, 22, 27, 31])
    """
    n = max(n, 1)
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


@register_method
class ProjectAway(Method):
    """Caption, flag the mentioned objects with low internal confidence, erase their text directions from the
    image tokens at one layer, regenerate.

    >>> fitted = ProjectAway().fit(model, edit_layer=1, text_rep="resid_post.2", weight=1.0)   # doctest: +SKIP
    """

    name = "erasure"
    summary = ("ProjectAway: caption, then erase the mentioned low-confidence objects' text directions from the "
               "image tokens at one layer and regenerate")

    def fit(self, model: Any, data: Sequence[CaptionItem] | None = None, *, objects: Sequence[str] | None = None,
            edit_layer: int | None = None, text_rep: str | None = None, weight: float | None = None,
            threshold: float | None = None, lens_norm: bool = False, top_k: int | None = PAPER_TOP_K,
            candidates: str = "mentioned", caption_tokens: int = PAPER_CAPTION_TOKENS, preset: str | None = None,
            edit_layers: Sequence[int] | None = None, text_reps: Sequence[str] | None = None,
            weights: Sequence[float] = DEFAULT_WEIGHTS, max_recall_drop: float = 0.05, prompt: str | None = None,
            n_images: int = 48, seed: int = PVP_FIT_SEED + 3, template: str | None = None) -> FittedIntervention:
        """Fit on ``data``: :class:`~haltrace.data.CaptionItem` images with their ground-truth objects, captioned
        with the items' ``prompt`` (else ``prompt``, else the usual "describe" prompt) through the model's chat
        template. ``objects`` (the words that can be flagged and erased) defaults to every object named in the
        data, in sorted order. Default data: the model's data source (an organism's ``n_images`` images).

        Unset ``threshold``, ``(edit_layer, text_rep)`` and ``weight`` are chosen on ``data`` (module docstring;
        the grid is ``edit_layers`` (default every block but the last, at most 8 evenly spaced:
        :func:`default_grid_layers`) x ``text_reps`` (default ``embed``, ``resid_pre.0`` and the ``resid_post``
        of up to 8 evenly spaced blocks) at weight 1, then ``weights``). ``preset="paper"``: the
        published LLaVA-1.5 cell at the model's relative depth (:func:`paper_cell`) for whichever of the three
        is unset, the paper's lens (no norm, top 50) and two passes; ``caption_tokens`` is pass 1's length
        (the paper's 512 by default)."""
        require_vlm(model, "ProjectAway (erasure)", "it edits image-token states")
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown ProjectAway preset {preset!r}; the only preset is 'paper'")
        if candidates not in CANDIDATES:
            raise InputError(f"candidates must be one of {', '.join(map(repr, CANDIDATES))}, got {candidates!r}")
        if int(caption_tokens) < 1:
            raise InputError(f"caption_tokens must be >= 1 (the first pass's length), got {caption_tokens}")
        if edit_layer is not None and not 0 <= edit_layer < model.n_layers:
            raise InputError(f"edit_layer {edit_layer} out of range 0..{model.n_layers - 1}")
        if text_rep is not None:
            check_text_rep(text_rep, model.n_layers)
        if not weights or any(not math.isfinite(float(w)) or float(w) <= 0 for w in weights):
            raise InputError(f"weights must be positive finite numbers, got {list(weights)}")
        from_preset: dict[str, Any] = {}
        if preset == "paper":
            cell = paper_cell(model.n_layers)
            from_preset = {k: v for k, v in cell.items() if {"edit_layer": edit_layer, "text_rep": text_rep,
                                                              "weight": weight}[k] is None}
            edit_layer = cell["edit_layer"] if edit_layer is None else edit_layer
            text_rep = cell["text_rep"] if text_rep is None else text_rep
            weight = cell["weight"] if weight is None else weight
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        items = of_kind(data, CaptionItem, method=self.name)
        if len(items) < 2:
            raise ValueError(f"ProjectAway needs at least 2 captioned images, got {len(items)}")
        question = prompt or items[0].prompt or "Please describe this image in detail."
        if any((it.prompt or question) != question for it in items):
            raise ValueError("ProjectAway fit items must share one caption prompt")
        prompt = item_prompts(model, [question], [items[0].image], template=template)[0]
        images = [open_image(it.image) for it in items]
        present = [set(it.objects) for it in items]
        objects = list(objects) if objects is not None else sorted(set().union(*present))
        if not objects:
            raise ValueError("pass objects= (the candidate object words to detect and erase)")
        described = (f"{len(items)} captioned images with their objects "
                     f"({'given' if source is not None else 'the model data source default'})")

        # 1. pass 1 on the fit images: captions (the unedited baseline), c_o, the threshold
        conf = torch.cat([internal_confidence(model, model.prepare([prompt] * len(chunk), chunk), objects,
                                              lens_norm=lens_norm, top_k=top_k)
                          for chunk in (images[s:s + 64] for s in range(0, len(images), 64))]).numpy()
        search = edit_layer is None or text_rep is None or weight is None
        base_caps = (captions(model, images, prompt, max_new_tokens=caption_tokens)
                     if candidates == "mentioned" or search else [])
        if candidates == "mentioned":  # the paper's population: the objects each caption mentions
            pairs = [(i, objects.index(o)) for i, cap in enumerate(base_caps) for o in dict.fromkeys(
                mentions(cap, objects))]
        else:
            pairs = [(i, k) for i in range(len(items)) for k in range(len(objects))]
        scores = np.array([conf[i, k] for i, k in pairs], dtype=float)
        labels = np.array([objects[k] in present[i] for i, k in pairs], dtype=int)
        detection: dict[str, Any] = {"population": ("objects the fit captions mention" if candidates == "mentioned"
                                                    else "every (image, object) pair"),
                                     "n": len(pairs), "n_hallucinated": int((labels == 0).sum()),
                                     "auroc": _auroc(scores, labels) if len(pairs) else None}
        if len(pairs) and labels.min() == 0 and labels.max() == 1:
            thr, bacc = choose_threshold(scores, labels)
            detection.update({"threshold": thr, "balanced_accuracy": bacc})
        if threshold is None:
            if "threshold" not in detection:
                raise InputError(f"ProjectAway cannot choose its threshold: the {len(items)} fit captions mention "
                                 f"{len(pairs)} objects of `objects`, {detection['n_hallucinated']} of them "
                                 "hallucinated (it needs both kinds); pass threshold= (flag c_o < threshold) or "
                                 "fit data whose captions hallucinate")
            threshold = detection["threshold"]
        detection["threshold_used"] = float(threshold)

        # 2. where and how hard to erase: the official (l_I, l_T) sweep at w = 1, then the weight ablation
        reps: dict[str, torch.Tensor] = {}
        shared: dict = {}  # pass 1 per prompt, shared by every grid cell (it does not depend on the cell)

        def directions(rep: str) -> torch.Tensor:
            if rep not in reps:
                reps[rep] = text_representations(model, objects, rep)
            return reps[rep]

        def build(layer: int, rep: str, w: float) -> ProjectAwayEdit:
            return ProjectAwayEdit(f"resid_post.{layer}", directions(rep), objects=objects, threshold=threshold,
                                   weight=w, lens_norm=lens_norm, top_k=top_k, candidates=candidates,
                                   caption_tokens=caption_tokens)

        def score(edit: ProjectAwayEdit) -> dict:
            edit.cache = shared
            with FittedIntervention(self.name, [edit], {}).apply(model):
                caps = captions(model, images, prompt, max_new_tokens=caption_tokens)
            return {**chair_tally(caps, present, objects), "erased": edit.stats["erased"]}

        base = chair_tally(base_caps, present, objects) if search else {}
        selection: list[dict] = []

        def pick(rows: list[dict], tie: str) -> dict:
            for r in rows:
                r["ok"] = base["recall"] - r["recall"] <= max_recall_drop
            ok = [r for r in rows if r["ok"]] or rows
            return min(ok, key=lambda r: (round(r["chair_i"], 6), r[tie] if tie else 0))

        if edit_layer is None or text_rep is None:
            layers = ([edit_layer] if edit_layer is not None else
                      list(edit_layers) if edit_layers is not None else default_grid_layers(model.n_layers - 1))
            rep_grid = ([text_rep] if text_rep is not None else list(text_reps) if text_reps is not None else
                        ["embed", "resid_pre.0"] + [f"resid_post.{k}" for k in default_grid_layers(model.n_layers)])
            for rep in rep_grid:
                check_text_rep(rep, model.n_layers)
            bad = [layer for layer in layers if not 0 <= int(layer) < model.n_layers]
            if bad:
                raise InputError(f"edit_layers {bad} out of range 0..{model.n_layers - 1}")
            w1 = 1.0 if weight is None else float(weight)
            stage = [{"stage": "layers", "edit_layer": layer, "text_rep": rep, "weight": w1,
                      **score(build(layer, rep, w1))} for layer in layers for rep in rep_grid]
            best = pick(stage, "")
            edit_layer, text_rep = best["edit_layer"], best["text_rep"]
            selection += stage
        if weight is None:
            done = {r["weight"]: r for r in selection if (r["edit_layer"], r["text_rep"]) == (edit_layer, text_rep)}
            stage = [done.get(float(w)) or {"stage": "weight", "edit_layer": edit_layer, "text_rep": text_rep,
                                            "weight": float(w), **score(build(edit_layer, text_rep, float(w)))}
                     for w in weights]
            weight = pick(stage, "weight")["weight"]
            selection += [r for r in stage if r.get("stage") == "weight"]
        if selection:
            selection = [{"baseline": base}] + selection

        edit = build(edit_layer, text_rep, float(weight))
        provenance = {
            "method": self.name, "paper": PAPER, "preset": preset,
            "layers": {"edit": layer_record(f"resid_post.{edit_layer}", f"l_I = {edit_layer} (hook on layers[l_I])"),
                       "text": (layer_record(text_rep, paper_text_layer(text_rep)) if text_rep.startswith("resid_")
                                else {"haltrace": text_rep, "paper": paper_text_layer(text_rep)})},
            "weight": float(weight), "threshold": float(threshold), "objects": objects,
            "candidates": candidates, "caption_tokens": int(caption_tokens),
            "lens": {"final_norm": "every layer" if lens_norm else "last hidden state only (as HF returns it)",
                     "top_k_renormalised": top_k, "layers": "hidden_states 0..N (embeddings + every block)",
                     "sub_tokens": "max over every sub-token"},
            "detection": detection,
            "positions": "image tokens", "phase": "prompt (prefill only)",
            "from_preset": from_preset,
            "selection": selection,
            "selection_rule": (f"threshold (unless given) by balanced accuracy over {detection['population']}; "
                               f"(edit_layer, text_rep) (unless given) at weight 1, then weight, each by min fit "
                               f"CHAIR_i with recall drop <= {max_recall_drop}, ties to the first cell / the "
                               f"smaller weight"),
            "figures": "selection CHAIR_i / recall are in-distribution (the fit images); evaluate on held-out sets",
            "deviations": _deviations(model, candidates, lens_norm, top_k, caption_tokens, text_rep, preset,
                                      from_preset, bool(selection)),
            # the words flagged per row and prompt while applied are the edit's runtime log (`edit.log`), not
            # provenance: provenance describes the fit and must not grow with every evaluated prompt
            "data": {"description": described, "n": len(images), "prompt": prompt,
                     "fingerprint": items_fingerprint(items)},
        }
        return FittedIntervention(self.name, [edit], provenance)


def _deviations(model: Any, candidates: str, lens_norm: bool, top_k: int | None, caption_tokens: int,
                text_rep: str, preset: str | None, from_preset: dict, searched: bool) -> list[str]:
    out = ["pass 1 answers the current prompt greedily (official: beam 5); pass 2 follows the caller's generate()",
           "caption words -> objects by exact word / n-gram match against `objects` (official: CHAIR's synonym "
           "table with singularisation; steering may not import haltrace.evals)",
           "threshold chosen on the fit captions by balanced accuracy (the paper's value was not recovered)",
           "image positions from the image token ids (official: hard-coded offsets 35..-12 for LLaVA-1.5)"]
    if candidates == "all":
        out.append("candidates='all': every low-c_o object is erased without a first pass (the paper erases only "
                   "objects the caption mentions)")
    if lens_norm:
        out.append("lens_norm=True: final norm on every layer (official: none, except HF's last hidden state)")
    if top_k != PAPER_TOP_K:
        out.append(f"top_k={top_k}: lens renormalised over {top_k or 'all'} tokens (official: the top 50)")
    if caption_tokens != PAPER_CAPTION_TOKENS:
        out.append(f"pass 1 stops after {caption_tokens} tokens (official: 512)")
    if text_rep == "unembed":
        out.append("text_rep='unembed' (the word's unembedding row) is not in the paper")
    if preset == "paper" and from_preset:
        out.append(f"paper cell (l_I = {PAPER_LLAVA['edit_layer']}, l_T = {PAPER_LLAVA['text_layer']}, w = "
                   f"{PAPER_LLAVA['weight']} on LLaVA-1.5's 32 layers) scaled to relative depth on {model.n_layers} "
                   f"layers: {from_preset}")
        out.append("the paper's Table-2 LLaVA cell is not printed in what was read of it; the preset takes the "
                   "official code's recorded LLaVA sweep cell (hallucinations -24.7%, recall kept)")
    if searched:
        out.append("(edit_layer, text_rep, weight) chosen on the fit data by the official sweep protocol (unset "
                   "ones), not the published cell (preset='paper')")
    return out
