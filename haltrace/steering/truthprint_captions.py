"""TruthPrInt's caption side: which caption tokens are objects and whether CHAIR calls them hallucinated, the
states that produced them (recorded while the model captions its fit images), and the backtracking decoder.

Split from :mod:`haltrace.steering.truthprint` (the method and its gate) to keep each file readable; the method
imports everything here, and so do its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from haltrace.data.images import open_images
from haltrace.data.items import CaptionItem
from haltrace.errors import InputError
from haltrace.steering.engine import Add, Gated, Intervention, LinearDetector, steer

SENTENCE_END = (".", "!", "?", "\n")
DEFAULT_CAPTION_PROMPT = "Please describe this image in detail."


def gate_of(fitted: Any) -> Gated:
    """The TruthPrInt gate (a :class:`~haltrace.steering.engine.Gated` edit) of a fit, a loaded fit or a gate."""
    if isinstance(fitted, Gated):
        return fitted
    gates = [iv for iv in getattr(fitted, "interventions", None) or [] if isinstance(iv, Gated)]
    if len(gates) != 1:
        raise ValueError(f"expected a TruthPrInt fit holding one Gated edit, got {type(fitted).__name__} with "
                         f"{len(gates)}; fit one with get_method('truthprint').fit(model, ...)")
    return gates[0]




# ----------------------------------------------------------------------------- CHAIR labels on caption tokens
@dataclass(frozen=True)
class ChairMatcher:
    """The project's CHAIR matching as TruthPrInt uses it: ``parse(caption)`` lists the canonical objects a
    caption mentions (repeats kept), ``canonical(word)`` maps a ground-truth name into the same space.

    ``rules="simple"`` with no ``synonyms`` is :func:`haltrace.data.chair.caption_objects` over
    ``vocabulary`` (the organism's CHAIR); ``rules="official"`` (default table: the packaged COCO synonyms) is
    the official ``chair.py`` parsing (:func:`haltrace.data.chair_rules.parse_caption`).
    """

    vocabulary: tuple[str, ...]
    rules: str = "simple"
    synonyms: str | None = None
    _table: Any = field(default=None, compare=False, repr=False)
    _phrases: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, vocabulary: Sequence[str] | None, rules: str = "simple", synonyms: Any = None) -> ChairMatcher:
        from haltrace.data.chair_rules import check_rules, identity_table, phrases_for, read_synonym_table

        try:
            check_rules(rules)
        except ValueError as err:
            raise InputError(f"--opt chair_rules: {err}") from None
        if synonyms is not None or rules == "official":
            table = read_synonym_table(synonyms, rules)
        else:
            if not vocabulary:
                raise InputError("TruthPrInt needs an object vocabulary to find objects in captions: give the fit "
                                 "items their objects, or pass vocabulary= (or chair_rules='official' for COCO)")
            table = identity_table(sorted(vocabulary))
        return cls(tuple(table.canonical), rules, None if synonyms is None else str(synonyms), table,
                   phrases_for(table, rules))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ChairMatcher:
        return cls.build(spec.get("vocabulary"), spec.get("chair_rules", "simple"), spec.get("synonyms"))

    def spec(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocabulary), "chair_rules": self.rules, "synonyms": self.synonyms}

    def parse(self, caption: str) -> list[str]:
        from haltrace.data.chair_rules import parse_caption

        return parse_caption(caption, self._table, self.rules, self._phrases)

    def canonical(self, word: str) -> str:
        return self._table.inverse.get(word, word)


def _word_starts(texts: Sequence[str]) -> list[int]:
    """Token indices that start a word, from the decoded prefixes ``texts[k]`` = tokens[:k] (``k = 0..n``):
    index 0, and every token whose text begins with a non-alphanumeric character or follows one."""
    return ([0] if len(texts) > 1 else []) + [k for k in range(1, len(texts) - 1)
                                                if _starts_word(texts[k], texts[k + 1])]


def _starts_word(prev: str, cur: str) -> bool:
    """Whether the token that turns the decoded text ``prev`` into ``cur`` starts a new word: its text begins
    with a non-alphanumeric character (a space, punctuation) or follows one. A token that rewrites the text
    before it (a byte piece completing a character) continues the word."""
    new = cur[len(prev):] if cur.startswith(prev) else "x"
    return not new or not new[0].isalnum() or bool(prev and not prev[-1].isalnum())


def caption_mentions(tokenizer: Any, ids: Sequence[int], matcher: ChairMatcher) -> tuple[list[tuple[int, str]], int]:
    """``([(first-token index, canonical object), ...], unplaced)`` for the object mentions CHAIR's parse finds in
    the caption that ``ids`` decode to, in order.

    A mention is placed on the first token of the word at whose end it appears (words split where a token
    starts with, or follows, a non-alphanumeric character); the parse of every prefix that ends at a word
    boundary must extend the previous one, else that word's mentions are counted in ``unplaced`` (e.g. the
    official rules' "toilet seat" clean-up). The mentions placed plus ``unplaced`` are the caption's CHAIR
    mentions.
    """
    texts = [tokenizer.decode(list(ids[:k]), skip_special_tokens=True) for k in range(len(ids) + 1)]
    bounds = _word_starts(texts) + [len(ids)]
    out: list[tuple[int, str]] = []
    unplaced, seen = 0, []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        found = matcher.parse(texts[end])
        if found[:len(seen)] == seen:
            out += [(start, w) for w in found[len(seen):]]
        else:
            unplaced += max(0, len(found) - len(seen))
        seen = found
    return out, unplaced


# ----------------------------------------------------------------------------- recording during generate
@dataclass
class _Recorder(Intervention):
    """Records, at every forward, the producing token's ``resid_post`` states of ``layers`` ([B, len, d] on CPU);
    edits nothing. Runtime only (never saved)."""

    layers: Sequence[int] = ()
    steps: list = field(default_factory=list, init=False, repr=False)

    def reads(self, model: Any) -> tuple[str, ...]:
        return tuple(f"resid_post.{i}" for i in self.layers)

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        self.steps.append(torch.stack([ctx.at_producing(ctx.reads[f"resid_post.{i}"]).float().cpu()
                                       for i in self.layers], 1))
        return x


def _recorder(layers: Sequence[int]) -> _Recorder:
    return _Recorder(f"resid_post.{max(layers)}", layers=list(layers))


def _stop_ids(model: Any, eos_token_id: Any = None) -> list[int]:
    ids: set[int] = set()
    for value in (eos_token_id, getattr(model.hf.generation_config, "eos_token_id", None),
                  getattr(model.tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return sorted(ids)


def _pad_id(model: Any, pad_token_id: Any = None) -> int:
    for value in (pad_token_id, getattr(model.hf.generation_config, "pad_token_id", None),
                  getattr(model.tokenizer, "pad_token_id", None), getattr(model.tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    return 0


def _cut(row: Sequence[int], stops: Sequence[int]) -> list[int]:
    out = []
    for t in row:
        if t in stops:
            break
        out.append(int(t))
    return out


@dataclass
class Caption:
    """A generated caption: token ids up to (not including) the end token, its text, and the producing states
    (``[n_tokens, len(layers), d]``, row k produced token k) when they were recorded."""

    ids: list[int]
    text: str
    states: torch.Tensor | None = None


@torch.no_grad()
def generate_captions(model: Any, items: Sequence[CaptionItem], *, max_new_tokens: int, layers: Sequence[int] = (),
                      interventions: Sequence[Any] = (), template: str | None = None, batch_size: int = 32
                      ) -> list[Caption]:
    """Greedy captions of ``items`` (each with its ``prompt``, else :data:`DEFAULT_CAPTION_PROMPT`, through the
    model's chat template), under ``interventions``; with ``layers``, each generated token's producing
    ``resid_post`` states as well (recorded during the same ``generate``)."""
    from haltrace.models.prompting import build_prompt

    tok = model.tokenizer
    stops, pad = _stop_ids(model), _pad_id(model)
    out: list[Caption | None] = [None] * len(items)
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.prompt or DEFAULT_CAPTION_PROMPT, []).append(i)
    for question, idx in groups.items():
        prompt = build_prompt(model, question, image=True, template=template)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            inputs = model.prepare([prompt] * len(chunk), open_images([items[i].image for i in chunk]))
            rec = _recorder(layers) if layers else None
            edits = ([rec] if rec is not None else []) + list(interventions)
            with steer(model, *edits) if edits else nullcontext():
                gen = model.hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=stops, pad_token_id=pad)
            new = gen[:, inputs["input_ids"].shape[1]:].tolist()
            for r, i in enumerate(chunk):
                ids = _cut(new[r], stops)
                states = torch.stack([rec.steps[k][r] for k in range(len(ids))]) if rec is not None and ids else None
                out[i] = Caption(ids, tok.decode(ids, skip_special_tokens=True).strip(), states)
    return [c for c in out if c is not None]


# ----------------------------------------------------------------------------- backtracking decoder
def _row_inputs(inputs: Any, b: int) -> tuple[list[int], dict[str, Any]]:
    """Row ``b`` of a (left-padded) batch: its real prompt ids and its other model inputs (tensors sliced)."""
    ids = inputs["input_ids"]
    n = int(ids.shape[0])
    mask = inputs.get("attention_mask")
    keep = mask[b].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
    prompt = ids[b][keep.to(ids.device)].tolist()
    rest: dict[str, Any] = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "position_ids"):  # positions are recomputed without padding
            continue
        if isinstance(value, torch.Tensor) and n > 1:
            if value.shape[0] != n:
                raise ValueError(f"generate_with_backtracking cannot split {key!r} (shape {tuple(value.shape)}) "
                                 f"into {n} rows; pass one row at a time")
            value = value[b:b + 1]
        rest[key] = value
    return prompt, rest


class _Watch:
    """Stopping criterion of one decoding segment: finds each object word once it is complete, scores its
    producing state with the detector, and stops the segment on a detection (while the sentence may still
    backtrack) or, in a re-decoding segment, at the sentence's end."""

    def __init__(self, row: _RowState, n_prompt: int, rec: _Recorder, redecode: bool):
        self.row, self.n_prompt, self.rec, self.redecode = row, n_prompt, rec, redecode
        self.n0 = len(row.ids)
        self.done = False

    def feats(self, k: int) -> torch.Tensor:
        return self.row.feats[k] if k < self.n0 else self.rec.steps[k - self.n0][0].reshape(-1)

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **_: Any) -> torch.BoolTensor:
        if not self.done:
            tokens = input_ids[0, self.n_prompt:].tolist()
            self.done = self.row.step(tokens, self.feats, self.redecode)
        return torch.full((input_ids.shape[0],), self.done, dtype=torch.bool, device=input_ids.device)


@dataclass
class _RowState:
    """One row's decoding state across segments."""

    tokenizer: Any
    matcher: ChairMatcher
    detector: LinearDetector
    stops: list[int]
    max_backtracks: int
    ids: list[int] = field(default_factory=list)
    conf: list[float] = field(default_factory=list)
    feats: list[torch.Tensor] = field(default_factory=list)
    texts: list[str] = field(default_factory=lambda: [""])
    word_start: int = 0
    seen: list[str] = field(default_factory=list)
    sentence_start: int = 0
    used: int = 0
    detection: dict[str, Any] | None = None
    sentence_ended: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    checked: set[int] = field(default_factory=set)  # word starts already scored (kept across a backtrack)

    def text(self, tokens: Sequence[int], k: int) -> str:
        while len(self.texts) <= k:
            n = len(self.texts)
            self.texts.append(self.tokenizer.decode(list(tokens[:n]), skip_special_tokens=True))
        return self.texts[k]

    def _word_done(self, tokens: Sequence[int], end: int, feats: Callable[[int], torch.Tensor]) -> bool:
        """The word ``tokens[word_start:end]`` is complete: score its new mentions; True on a detection that
        may backtrack."""
        found = self.matcher.parse(self.text(tokens, end))
        new = found[len(self.seen):] if found[:len(self.seen)] == self.seen else []
        self.seen = found
        start, self.word_start = self.word_start, end
        if start in self.checked:  # a word before the cut point, scored before the backtrack
            return False
        if new:
            self.checked.add(start)
        for word in new:
            p = float(self.detector.probability(feats(start)[None])[0])
            event = {"token": start, "object": word, "p": round(p, 4)}
            self.events.append(event)
            if p > self.detector.threshold:
                event["detected"] = True
                if self.used < self.max_backtracks:
                    self.detection = event
                    return True
        return False

    def step(self, tokens: Sequence[int], feats: Callable[[int], torch.Tensor], redecode: bool) -> bool:
        """After token ``tokens[-1]`` was appended; True stops the segment."""
        k = len(tokens) - 1
        if tokens[k] in self.stops:
            return self._word_done(tokens, k, feats)
        prev, cur = self.text(tokens, k), self.text(tokens, k + 1)
        if k > self.word_start and _starts_word(prev, cur):
            if self._word_done(tokens, k, feats):
                return True
        new = cur[len(prev):] if cur.startswith(prev) else ""
        if any(mark in new for mark in SENTENCE_END):
            self.sentence_ended = True
            if redecode:
                return True
            self.sentence_start, self.used = k + 1, 0
        return False

    def truncate(self, r: int) -> None:
        """Keep the first ``r`` tokens. When token ``r`` started a word, the kept words are complete (and stay
        scored); else the word cut in the middle is re-decoded, so it is scored again once complete."""
        self.text(self.ids, min(r + 1, len(self.ids)))  # the decoded prefixes up to the cut
        starts = _word_starts(self.texts)
        del self.ids[r:], self.conf[r:], self.feats[r:], self.texts[r + 1:]
        if r in starts:
            self.word_start = r
        else:
            self.word_start = max((s for s in starts if s < r), default=0)
        self.seen = self.matcher.parse(self.texts[self.word_start]) if self.word_start else []
        self.checked = {k for k in self.checked if k < self.word_start}


@torch.no_grad()
def generate_with_backtracking(model: Any, fitted: Any, inputs: Any, *, max_new_tokens: int = 64,
                               eos_token_id: Any = None, pad_token_id: Any = None, max_backtracks: int | None = None,
                               matcher: ChairMatcher | None = None, log: list | None = None) -> torch.Tensor:
    """TruthPrInt's decoding: greedy decoding watched by the detector, backtracking on a detection.

    For each row of ``inputs`` (``model.prepare`` output; rows are decoded one at a time): decode greedily;
    when an object word (CHAIR matching, the fit's vocabulary and rules) is complete, score the state that
    produced its first token; if ``p > threshold`` and the sentence has backtracked fewer than ``max_backtracks``
    times, cut the caption back to the least confident token (top-1 probability) of the current sentence before
    the object word (the object itself when it opens the sentence) and re-decode from there with the truthful
    shift (the gate's ``Add``) at every producing position until the sentence ends. Returns ``generate``-style
    sequences (prompt ids as given, then the new tokens, padded with ``pad_token_id``). ``log`` (a list)
    receives one dict per row: every object checked (``token``, ``object``, ``p``), the backtracks and their
    cut points. Call it outside ``fitted.apply`` (it installs what it needs itself).
    """
    from transformers import StoppingCriteriaList

    gate = gate_of(fitted)
    det, add = gate.detector, gate.inner
    spec = dict((getattr(fitted, "provenance", None) or {}).get("backtracking") or {})
    if matcher is None:
        if not spec.get("vocabulary") and spec.get("chair_rules", "simple") == "simple" and not spec.get("synonyms"):
            raise ValueError("this fit records no object vocabulary for backtracking (a yes/no-variant or older "
                             "fit); pass matcher=ChairMatcher.build(vocabulary, rules) or fit variant='caption'")
        matcher = ChairMatcher.from_spec(spec)
    max_backtracks = int(spec.get("max_backtracks", 1) if max_backtracks is None else max_backtracks)
    stops, pad = _stop_ids(model, eos_token_id), _pad_id(model, pad_token_id)
    det.validate(model)
    add.validate(model)
    device = inputs["input_ids"].device
    new_rows = []
    for b in range(int(inputs["input_ids"].shape[0])):
        prompt, rest = _row_inputs(inputs, b)
        row = _RowState(model.tokenizer, matcher, det, stops, max_backtracks)
        redecode, backtracks = False, []
        while len(row.ids) < max_new_tokens and not (row.ids and row.ids[-1] in stops):
            rec = _recorder(det.layers)
            edits: list[Any] = [rec]
            if redecode:
                edits.append(Add(add.hook, add.vector, alpha=add.alpha, positions="producing"))
            watch = _Watch(row, len(prompt), rec, redecode)
            row.detection, row.sentence_ended = None, False
            ids = torch.tensor([prompt + row.ids], device=device)
            with steer(model, *edits):
                out = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **rest,
                                        max_new_tokens=max_new_tokens - len(row.ids), do_sample=False,
                                        eos_token_id=stops, pad_token_id=pad, output_scores=True,
                                        return_dict_in_generate=True,
                                        stopping_criteria=StoppingCriteriaList([watch]))
            new = out.sequences[0, ids.shape[1]:].tolist()
            for k, tok_id in enumerate(new):
                row.ids.append(int(tok_id))
                row.conf.append(float(torch.softmax(out.scores[k][0].float(), -1).max()))
                row.feats.append(rec.steps[k][0].reshape(-1))
                if tok_id in stops:
                    break
            if row.detection is None and len(row.ids) >= max_new_tokens and row.ids[-1] not in stops:
                # the budget ended inside a word: that last word is complete now
                row._word_done(row.ids, len(row.ids), row.feats.__getitem__)
            if row.detection is not None:
                at = int(row.detection["token"])
                span = range(row.sentence_start, at)
                r = min(span, key=lambda k: row.conf[k]) if len(span) else at
                backtracks.append({"object": row.detection["object"], "at": at, "p": row.detection["p"],
                                   "cut_to": r, "confidence": round(row.conf[r], 4)})
                row.truncate(r)
                row.used += 1
                redecode = True
                continue
            if redecode and row.sentence_ended:  # the re-decoded sentence is over: watch the next one
                row.sentence_start, row.used, redecode = len(row.ids), 0, False
                continue
            break
        new_rows.append(row.ids)
        if log is not None:
            log.append({"checked": row.events, "backtracks": backtracks})
    width = max((len(r) for r in new_rows), default=0)
    new_t = torch.full((len(new_rows), width), pad, dtype=inputs["input_ids"].dtype, device=device)
    for i, r in enumerate(new_rows):
        if r:
            new_t[i, :len(r)] = torch.tensor(r, dtype=new_t.dtype)
    return torch.cat([inputs["input_ids"], new_t], 1)


def backtracking_captions(model: Any, fitted: Any, items: Sequence[Any], *, max_new_tokens: int = 64,
                          template: str | None = None, log: list | None = None) -> list[str]:
    """Captions of ``items`` (``CaptionItem``-like: ``image`` and ``prompt``) through
    :func:`generate_with_backtracking`, one row at a time (no padding)."""
    from haltrace.models.prompting import build_prompt

    stops = _stop_ids(model)
    out = []
    for it in items:
        inputs = model.prepare([build_prompt(model, it.prompt or DEFAULT_CAPTION_PROMPT, image=True,
                                             template=template)], open_images([it.image]))
        seq = generate_with_backtracking(model, fitted, inputs, max_new_tokens=max_new_tokens, log=log)
        ids = _cut(seq[0, inputs["input_ids"].shape[1]:].tolist(), stops)
        out.append(model.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


