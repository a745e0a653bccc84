"""The computation behind ``haltrace explain``: one image, one prompt, one answer, every generated token explained.

Everything is read from the ``generate`` call that produced the answer (hooks on the decoder blocks and, with
eager attention, on the attention modules), so what is shown is what made each token, also under steering:

* ``resid_post.l`` at the image-token positions (prefill) and at each token's *predicting* position;
* the logit lens (:func:`haltrace.trace.lens.project`, the library's projection) of each generated token over the
  image positions at every layer (probability and rank: ProjectAway's spatial localisation), and at the
  predicting position (the token's trajectory over layers, with a competitor's);
* the attention of the predicting position to every image token per layer (mean over heads), whose sum is
  :func:`haltrace.trace.attention.attention_to_image`'s per-layer ratio;
* scores: a fitted TruthPrInt detector's ``LinearDetector.probability`` (its ``Gated`` edit) at the predicting position, a probe vector's
  projection, and ProjectAway's internal confidence ``c_o`` (max over layers and image patches of the word's
  probability; :func:`haltrace.trace.lens.image_token_confidence`) for object words;
* with ``truth``: object words found with CHAIR's rules and marked real or hallucinated.

Token ``t`` is predicted at the last position of the ``t``-th forward of ``generate``; the numbers equal the
library functions run on ``prompt + answer[:t]`` (tests/integration/test_explain_organism.py checks this).
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from haltrace.models.adapters.base import first_tensor

if TYPE_CHECKING:
    from haltrace.models.base import Model

_WORD = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*")
SIG = 6  # significant digits kept in the page's numbers


def _r(x: float) -> float:
    return float(f"{float(x):.{SIG}g}")


def _rows(t: torch.Tensor) -> list:
    """A tensor as nested lists of floats rounded to ``SIG`` significant digits (NaN -> None)."""
    flat = t.detach().float().cpu()
    if flat.dim() == 0:
        v = float(flat)
        return None if v != v else _r(v)  # type: ignore[return-value]
    return [_rows(x) for x in flat]


# ------------------------------------------------------------------------------------------- recording
class _Recorder:
    """Hooks that keep, per layer, the prefill's image-position residuals and each forward's last-position
    residual, and (eager attention) the last query row's attention on the image tokens ``[H, I]``."""

    def __init__(self, model: Model, image_positions: torch.Tensor, prompt_length: int, attention: bool):
        self.model = model
        self.image_positions = image_positions  # absolute positions [I]
        self.prompt_length = prompt_length
        self.attention = attention
        n = model.n_layers
        self.image_resid: list[torch.Tensor | None] = [None] * n
        self.last_resid: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.attn: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.seen = [0] * n

    def layer_hook(self, i: int) -> Callable[..., None]:
        def fn(_m: Any, _args: Any, out: Any) -> None:
            h = first_tensor(out)
            if h.shape[1] > 1 or not self.last_resid[i]:  # the prefill
                if len(self.image_positions):
                    self.image_resid[i] = h[0, self.image_positions.to(h.device)].detach().float().cpu()
            self.last_resid[i].append(h[0, -1].detach().float().cpu())
        return fn

    def attn_hook(self, i: int) -> Callable[..., None]:
        def fn(_m: Any, _args: Any, _kwargs: Any, out: Any) -> None:
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise RuntimeError(f"attention layer {i} returned no weights; load the model with "
                                   'attn_implementation="eager"')
            n_q, n_k = weights.shape[-2], weights.shape[-1]
            total = self.seen[i] + n_q
            self.seen[i] = total
            # keys are right-aligned to absolute positions (sliding-window caches keep only the newest keys)
            cols = self.image_positions.to(weights.device) - (total - n_k)
            row = weights[0, :, -1, :].detach().float()  # [H, K]
            ok = cols >= 0
            got = torch.zeros(row.shape[0], len(cols), device=row.device)
            if bool(ok.any()):
                got[:, ok] = row[:, cols[ok]]
            self.attn[i].append(got.cpu())
        return fn

    def attached(self) -> AbstractContextManager[Any]:
        from haltrace.trace.capture import temporary_hooks

        adapter = self.model.adapter
        forward = [(adapter.layers[i], self.layer_hook(i)) for i in range(self.model.n_layers)]
        stack = temporary_hooks(forward=forward)
        if not self.attention:
            return stack
        from contextlib import ExitStack

        es = ExitStack()
        es.enter_context(stack)
        es.enter_context(temporary_hooks(
            forward=[(adapter.attention(i), self.attn_hook(i)) for i in range(self.model.n_layers)],
            with_kwargs=True))
        return es


# ------------------------------------------------------------------------------------------- helpers
def _eos_ids(model: Model) -> set[int]:
    from haltrace.trace.generation import _eos_ids as eos_of

    return eos_of(model, {})


def _pieces(tokenizer: Any, ids: list[int]) -> tuple[list[str], list[tuple[int, int]], str]:
    """Each token's text as it adds to the decoded answer, its character span, and the answer text."""
    spans, pieces, prev = [], [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if not text.startswith(prev):  # a decoder that rewrites earlier text: fall back to the piece alone
            text = prev + tokenizer.decode(ids[t:t + 1], skip_special_tokens=True)
        spans.append((len(prev), len(text)))
        pieces.append(text[len(prev):])
        prev = text
    return pieces, spans, prev


def _token_label(tokenizer: Any, tid: int, piece: str) -> str:
    if piece.strip():
        return piece
    tok = tokenizer.convert_ids_to_tokens([tid])[0]
    return tok if tok else piece


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]


def _organism_vocabulary(model: Model) -> list[str] | None:
    from haltrace.organism.paths import organism_world

    try:
        world = organism_world(model)
    except Exception:  # not an organism after all (a missing shipped folder, an unreadable world.json)
        return None
    return None if world is None else list(world.config.kinds)


def chair_table_for(model: Model, table: Any = None, rules: str | None = None,
                    truth: Sequence[str] = ()) -> tuple[Any, str, str]:
    """``(SynonymTable, rules, source)``: the given table; an organism's kinds (simple rules); else COCO's official
    table. Truth words the table lacks are added as their own class (an object named in the truth is an object)."""
    from haltrace.data.chair_rules import RULES, SynonymTable, identity_table, read_synonym_table

    if isinstance(table, (str, Path)):
        rules = rules or "official"
        table = read_synonym_table(table, rules)
    elif isinstance(table, (list, tuple, set, frozenset)):
        table, rules = identity_table(table, "given vocabulary"), rules or "simple"
    elif table is None:
        kinds = _organism_vocabulary(model)
        if kinds is not None:
            table, rules = identity_table(kinds, "organism kinds"), rules or "simple"
        else:
            table, rules = read_synonym_table(), rules or "official"
    rules = rules or "official"
    if rules not in RULES:
        raise ValueError(f"unknown CHAIR rules {rules!r}; choose one of {list(RULES)}")
    missing = [t for t in truth if t not in table.inverse]
    if missing:
        inverse = dict(table.inverse)
        inverse.update({t: t for t in missing})
        table = SynonymTable(frozenset(table.words | set(missing)), inverse, tuple(table.canonical) + tuple(missing),
                             table.source + " + truth words")
    return table, rules, table.source


def _object_mentions(text: str, table: Any, rules: str) -> list[dict[str, Any]]:
    """Object mentions in ``text``: ``{"word", "canonical", "start", "end"}``, one per CHAIR mention, found word
    by word (two-word names merged when CHAIR's rules merge them)."""
    from haltrace.data.chair_rules import parse_caption

    words = _words(text)
    out, i = [], 0
    while i < len(words):
        w, s, e = words[i]
        single = parse_caption(w, table, rules)
        if i + 1 < len(words):
            w2, _, e2 = words[i + 1]
            pair = parse_caption(f"{w} {w2}", table, rules)
            if len(pair) == 1 and pair != single + parse_caption(w2, table, rules):
                out.append({"word": f"{w} {w2}", "canonical": pair[0], "start": s, "end": e2})
                i += 2
                continue
        for canonical in single:
            out.append({"word": w, "canonical": canonical, "start": s, "end": e})
        i += 1
    return out


def _probe_layer(vec: Any, layer: int | None) -> int:
    if layer is not None:
        return int(layer)
    metrics = (vec.provenance or {}).get("metrics") or {}
    scored = {}
    for key, value in metrics.items():
        auroc = value.get("auroc") if isinstance(value, Mapping) else None
        if isinstance(auroc, (int, float)) and int(key) in vec.layers and auroc == auroc:
            scored[int(key)] = float(auroc)
    return max(scored, key=lambda k: (scored[k], k)) if scored else vec.layers[-1]


def _resolve_detector(detector: Any) -> Any:
    if detector is None:
        return None
    if isinstance(detector, (str, Path)):
        from haltrace.steering.results import load_fitted

        detector = load_fitted(detector)
    # a fitted TruthPrInt holds its detector inside an engine Gated edit (fitted.interventions); a Gated holds it
    # as .detector; a LinearDetector (or an old-style gate object) is the detector itself
    for item in getattr(detector, "interventions", None) or []:
        if hasattr(getattr(item, "detector", None), "probability"):
            detector = item
            break
    gate = getattr(detector, "detector", None) or detector
    if not hasattr(gate, "probability") or not hasattr(gate, "layers"):
        raise ValueError("--detector needs a fitted TruthPrInt folder (`haltrace steer --method truthprint --out "
                         f"DIR`) or its Gated edit; got {type(detector).__name__}")
    return gate


def _resolve_probe(probe: Any, model: Model) -> Any:
    if probe is None:
        return None
    if isinstance(probe, (str, Path)):
        from haltrace.steering.vector import SteeringVector

        return SteeringVector.load(probe, model)
    return probe


def _resolve_steering(model: Model, method: str | None, fitted: Any) -> Any:
    if method is not None and fitted is not None:
        raise ValueError("pass either method= (fit it now) or fitted= (a fitted intervention or its folder), "
                         "not both")
    if method is not None:
        from haltrace.steering.registry import get_method

        return get_method(method).fit(model)
    if isinstance(fitted, (str, Path)):
        from haltrace.steering.results import load_fitted

        return load_fitted(fitted)
    return fitted


# ------------------------------------------------------------------------------------------- one answer
def _lens_over(model: Model, resid: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor, torch.Tensor]:
    """Lens of ``resid[L, P, d]``: probabilities and ranks ``[L, P, len(ids)]`` of ``ids`` and top-1 ids
    ``[L, P]``; full logits are never kept beyond one layer. Ranks count vocabulary entries with a strictly greater logit
    (as :func:`haltrace.trace.lens.project`); one layer at a time, ranks by sorting once per row."""
    from haltrace.trace.lens import project

    probs, ranks, top = [], [], []
    idx = torch.tensor(ids, dtype=torch.long)
    for layer in range(resid.shape[0]):
        res = project(model, resid[layer:layer + 1], top_k=1, return_logits=True)
        z = res.logits[0].float().cpu()  # [P, V]
        lse = res.log_normaliser[0].float().cpu()  # [P]
        picked = z[:, idx]  # [P, T]
        probs.append((picked - lse[:, None]).exp())
        ordered = z.sort(dim=-1).values
        ranks.append(z.shape[-1] - torch.searchsorted(ordered, picked.contiguous(), right=True))
        top.append(res.top_ids[0, :, 0].cpu())
    return torch.stack(probs), torch.stack(ranks), torch.stack(top), idx


def explain_answer(model: Model, inputs: Mapping[str, Any], *, max_new_tokens: int = 32,
                   context: Callable[[], AbstractContextManager[Any]] | None = None,
                   generate_kwargs: Mapping[str, Any] | None = None, detector: Any = None, probe: Any = None,
                   probe_layer: int | None = None, truth: Sequence[str] | None = None, chair: Any = None,
                   competitor: str | None = None, top_k: int = 5, label: str = "answer") -> dict[str, Any]:
    """Generate one answer (greedy) for one prompt and explain every token; returns a JSON-ready dict.

    ``context()`` wraps the generation (a steering intervention); ``chair`` is ``(table, rules, source)`` from
    :func:`chair_table_for`.
    """
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("explain works on one prompt at a time")
    tok = model.tokenizer
    prompt_length = int(ids.shape[1])
    image_mask = model.image_token_mask(ids)[0]
    image_positions = torch.nonzero(image_mask).flatten().cpu()
    eager = model.adapter.attn_implementation == "eager"
    attention = eager and len(image_positions) > 0
    rec = _Recorder(model, image_positions, prompt_length, attention)
    gen = {"do_sample": False, "max_new_tokens": max_new_tokens}
    if tok is not None and tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    gen.update(generate_kwargs or {})
    started = time.perf_counter()
    with (context() if context is not None else nullcontext()), rec.attached(), torch.no_grad():
        sequences = model.hf.generate(**inputs, **gen)
    if not isinstance(sequences, torch.Tensor):
        sequences = sequences.sequences
    t_generate = time.perf_counter() - started
    new = sequences[0, prompt_length:].tolist()
    eos = _eos_ids(model)
    n = next((i for i, t in enumerate(new) if t in eos), len(new))
    shown = new[:n] if n > 0 else new[:1]  # an answer that is only EOS still shows that token
    n = len(shown)

    t0 = time.perf_counter()
    last = torch.stack([torch.stack(rec.last_resid[i][:n]) for i in range(model.n_layers)])  # [L, n, d]
    pieces, spans, text = _pieces(tok, shown)
    # objects (CHAIR) and the words they are
    mentions: list[dict[str, Any]] = []
    if chair is not None:
        table, rules, _ = chair
        mentions = _object_mentions(text, table, rules)
        truth_set = {table.inverse.get(t, t) for t in (truth or [])}
        for m in mentions:
            m["verdict"] = None if truth is None else ("real" if m["canonical"] in truth_set else "hallucinated")
            m["tokens"] = [t for t, (s, e) in enumerate(spans) if s < m["end"] and e > m["start"] and e > s]
    from haltrace.trace.lens import target_token_ids

    word_ids = {}
    for m in mentions:
        try:
            word_ids[m["word"]] = target_token_ids(tok, [m["word"]])[0][0]
        except ValueError:
            word_ids[m["word"]] = None
    # competitor per token: a fixed word, else the runner-up at the last layer
    fixed = target_token_ids(tok, [competitor])[0][0] if competitor else None
    from haltrace.trace.lens import project

    last_res = project(model, last[-1:], top_k=max(top_k, 2))
    top_ids = last_res.top_ids[0].cpu()  # [n, k]
    top_lp = last_res.top_logprobs[0].cpu()
    comp = []  # a given competitor that is the token itself says nothing: the runner-up stands in for it there
    for t in range(n):
        if fixed is not None and fixed != shown[t]:
            comp.append(fixed)
        else:
            comp.append(next(int(i) for i in top_ids[t].tolist() if int(i) != shown[t]))
    want = sorted(set(shown) | set(comp) | {i for i in word_ids.values() if i is not None})
    col = {tid: j for j, tid in enumerate(want)}
    traj_p, traj_r, traj_top, _ = _lens_over(model, last, want)  # [L, n, T]
    has_image = len(image_positions) > 0
    if has_image:
        img_resid = torch.stack([rec.image_resid[i] for i in range(model.n_layers)])  # [L, I, d]
        img_ids = sorted(set(shown) | {i for i in word_ids.values() if i is not None})
        icol = {tid: j for j, tid in enumerate(img_ids)}
        patch_p, patch_r, _, _ = _lens_over(model, img_resid, img_ids)  # [L, I, T]
    if attention:
        attn = torch.stack([torch.stack(rec.attn[i][:n]) for i in range(model.n_layers)])  # [L, n, H, I]
    gate_p = None
    if detector is not None:
        feats = torch.cat([last[x] for x in detector.layers], dim=-1)  # [n, len(layers) * d]
        gate_p = detector.probability(feats).cpu()
    probe_s, p_layer = None, None
    if probe is not None:
        p_layer = _probe_layer(probe, probe_layer)
        d = probe.for_layer(p_layer).float()
        probe_s = last[p_layer] @ (d / d.norm())
    tokens = []
    for t in range(n):
        tid = shown[t]
        entry: dict[str, Any] = {
            "index": t, "id": int(tid), "text": _token_label(tok, tid, pieces[t]), "piece": pieces[t],
            "position": prompt_length - 1 + t, "span": list(spans[t]),
            "prob": _r(traj_p[-1, t, col[tid]]), "rank": int(traj_r[-1, t, col[tid]]),
            "top": [{"token": tok.convert_ids_to_tokens([int(i)])[0], "prob": _r(lp.exp())}
                    for i, lp in zip(top_ids[t, :top_k].tolist(), top_lp[t, :top_k], strict=True)],
            "lens_rank": [int(v) for v in traj_r[:, t, col[tid]]],
            "lens_prob": _rows(traj_p[:, t, col[tid]]),
            "lens_top": tok.convert_ids_to_tokens([int(i) for i in traj_top[:, t]]),
            "competitor": {"id": comp[t], "text": tok.convert_ids_to_tokens([comp[t]])[0],
                           "rule": "given" if comp[t] == fixed else "runner-up at the last layer",
                           "lens_rank": [int(v) for v in traj_r[:, t, col[comp[t]]]],
                           "lens_prob": _rows(traj_p[:, t, col[comp[t]]])},
        }
        if has_image:
            pp = patch_p[:, :, icol[tid]]  # [L, I]
            entry["patch_prob"] = _rows(pp)
            entry["patch_rank"] = [[int(v) for v in row] for row in patch_r[:, :, icol[tid]]]
            entry["confidence"] = _r(pp.max())  # ProjectAway's c_o of this token
        if attention:
            a = attn[:, t]  # [L, H, I]
            entry["attn_patch"] = _rows(a.mean(1))
            entry["attn_mass"] = _rows(a.sum(-1).mean(-1))
            entry["attn_baseline"] = _r(len(image_positions) / (prompt_length + t))
        if gate_p is not None:
            entry["detector"] = _r(gate_p[t])
        if probe_s is not None:
            entry["probe"] = _r(probe_s[t])
        owner = next((m for m in mentions if t in m["tokens"]), None)
        if owner is not None:
            entry["object"] = owner["canonical"]
            entry["word"] = owner["word"]
            entry["verdict"] = owner["verdict"]
        tokens.append(entry)
    for m in mentions:
        wid = word_ids.get(m["word"])
        m["first_token_id"] = wid
        if has_image and wid is not None:
            m["confidence"] = _r(patch_p[:, :, icol[wid]].max())  # = image_token_confidence(word)
            flat = patch_p[:, :, icol[wid]]
            where = int(flat.argmax())
            m["confidence_layer"], m["confidence_patch"] = where // flat.shape[1], where % flat.shape[1]
    chair_out = None
    if chair is not None:
        from haltrace.data.chair_rules import parse_caption

        table, rules, source = chair
        whole = parse_caption(text, table, rules)
        chair_out = {"rules": rules, "table": source, "truth": list(truth) if truth is not None else None,
                     "objects": [m["canonical"] for m in mentions], "caption_objects": whole,
                     "agrees_with_caption_parse": whole == [m["canonical"] for m in mentions],
                     "hallucinated": [m["canonical"] for m in mentions if m["verdict"] == "hallucinated"]}
    return {
        "label": label, "text": text, "tokens": tokens, "mentions": mentions, "chair": chair_out,
        "prompt_length": prompt_length, "n_image_tokens": int(len(image_positions)),
        "image_positions": image_positions.tolist(), "attention": attention,
        "attention_note": "" if attention else ("no image tokens in the prompt" if not has_image else
                                                 "attention maps need eager attention; load the model with "
                                                 'attn_implementation="eager"'),
        "probe_layer": p_layer,
        "seconds": {"generate": t_generate, "analysis": time.perf_counter() - t0},
    }


def _mark_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Mark tokens whose words differ between the two answers (difflib on words); returns a summary."""
    wa, wb = _words(before["text"]), _words(after["text"])
    sm = difflib.SequenceMatcher(a=[w for w, _, _ in wa], b=[w for w, _, _ in wb], autojunk=False)
    changed_a, changed_b = set(), set()
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op != "equal":
            changed_a.update(range(i1, i2))
            changed_b.update(range(j1, j2))
    for answer, words, changed in ((before, wa, changed_a), (after, wb, changed_b)):
        for tokn in answer["tokens"]:
            s, e = tokn["span"]
            tokn["changed"] = any(k in changed and s < we and e > ws for k, (_, ws, we) in enumerate(words))
        answer["changed_words"] = [words[k][0] for k in sorted(changed)]
    return {"removed": before["changed_words"], "added": after["changed_words"], "same": before["text"] == after["text"]}
