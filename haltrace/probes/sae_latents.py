"""Entity-recognition SAE latents (Ferrando et al., ICLR 2025, "Do I know this entity?"): separation scores,
the generic-token filter, a held-out entity split, latent directions, refusal steering and its baselines.

Activations are taken at the last token of the entity name in text-only questions. For each latent ``j`` the
activation frequency ``f[j] = mean 1[a_j > 1e-6]`` is computed on known and on unknown entities; the
*known* score is ``f_known - f_unknown`` and the *unknown* score its negative, each the **minimum over entity
types** (a latent must separate players and bands alike). Latents that fire on 2 % or more of generic
(non-entity) tokens are dropped before ranking. Entities, not rows, are split into a selection half (latents
are ranked on it: ``score``, in-sample) and a held-out half (``score_heldout``, and the steering targets). A
latent's steering direction is its decoder row, normalised, with ``typical activation x ||W_dec[j]||`` as the
suggested coefficient (the residual-stream size of the latent's own contribution when it fires).

Steering for the refusal measurement adds ``coef * direction`` to the hook's output at the entity's last
token and every later prompt token, in the prompt forward pass only (the answer is one greedy token). Two
baselines run at the same coefficients: random unit Gaussian directions, and random latents of the same SAE
whose separation score is 0 (the paper's baseline), each reported as mean ± sd.

This module takes its data as arguments (rows of entity questions, stores); it never builds a data set
itself. The organism's rows come from :mod:`haltrace.probes.sae_cli` (``organism_entity_rows``).

Fidelity to the paper and ``javiferran/sae_entities`` (methods-llm-eval.md §1, methods-fidelity.md §4):

| paper / official code | haltrace | same? |
|---|---|---|
| fires: ``act > 1e-6`` | :data:`FIRE_THRESHOLD` | same |
| score ``f_known - f_unknown`` (``absolute_difference``), min over entity types (``scores_min``) | :func:`separation_scores` | same |
| known = >= 2 attributes answered right, unknown = none (the model's own samples) | the caller's ``known`` flag | different: the organism's labels are by construction (taught / taught-unknown / never seen) |
| last entity token (``find_string_in_tokens``) | :func:`entity_spans` (tokenizer offsets) | same token |
| Pile filter: keep latents firing on < 2 % of random Pile tokens | :func:`firing_frequency` + :func:`generic_filter`, ``max_generic_freq=0.02`` | same rule; the generic tokens are the caller's non-entity stores (organism: its image-question store), else the tokens before each entity; there is no Pile here |
| entities split 50/50 (``train_test_split``, fixed seed); scores from train, evaluation on test | :func:`split_entities` (``heldout_fraction=0.5``, ``seed``): ``score`` in-sample, ``score_heldout`` and the steering targets held out | same; the test half is not split again into validation/test |
| direction = decoder row (Gemma Scope rows ~unit norm) | :func:`latent_direction` (normalised) | same |
| coefficient 15 (known) / 20 (unknown) in residual units | ``multiples x unit`` (``norm`` = mean ‖x‖ at the entity token); raw ``coefs`` reported | different: the organism's residual scale differs |
| steer ``entity_last_to_end``, prompt pass only | :func:`steered_answers` | same |
| refusal rate on test-split entities (``is_generation_refusal``, 30 tokens) | :func:`entity_refusal_experiment` | same split; refusal = the one greedy answer token equals ``refusal_word`` |
| baseline: random latents with min score 0, mean ± std | :func:`random_latents` (``random_latents_*`` keys) | same rule (if too few score exactly 0, the smallest abs(score) are used and reported) |
| (none) | Gaussian unit directions (``random_*`` keys) | extra baseline |
| orthogonalised-weights model | not implemented | missing |
| base-model SAE applied to the chat model | one model | different: the organism has no chat variant |

Example
-------
>>> rows = organism_entity_rows(world)              # from haltrace.probes.sae_cli           # doctest: +SKIP
>>> result = score_entity_latents(sae, model, rows, store="acts/entity", generic_stores=["acts/image"])  # doctest: +SKIP
>>> result["generic_filter"]["dropped"], result["unknown"][0]["score"], result["unknown"][0]["score_heldout"]  # doctest: +SKIP
>>> exp = entity_refusal_experiment(sae, model, result)                                     # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from haltrace.conventions import parse_hook
from haltrace.errors import InputError
from haltrace.probes.sae import SAEError, check_sae_fits, encode, sae_hook

if TYPE_CHECKING:
    from sae_lens import SAE

FIRE_THRESHOLD = 1e-6  # as in sae_entities: a latent "fires" above this
GENERIC_MAX_FREQ = 0.02  # sae_entities keeps latents firing on < 2 % of random Pile tokens
HELDOUT_FRACTION = 0.5  # sae_entities: train_test_split(test_size=0.5) of known and of unknown entities
ROW_KEYS = ("prompt", "name", "etype", "known", "group")


# ---------------------------------------------------------------------------------------------- scores
def separation_scores(acts: torch.Tensor, known: torch.Tensor, types: Sequence[str], *,
                      threshold: float = FIRE_THRESHOLD) -> dict[str, Any]:
    """Ferrando et al.'s separation scores of every latent, minimum over entity types.

    Args:
        acts: ``[n, d_sae]`` latent activations, one row per entity question.
        known: ``BoolTensor[n]``: True for known entities, False for unknown ones.
        types: entity type of each row (e.g. ``"player"``/``"band"``); each type needs both classes.

    Returns:
        ``{"known": [d_sae], "unknown": [d_sae], "types": [...], "freq_known"/"freq_unknown": [n_types, d_sae],
        "mean_known"/"mean_unknown": [d_sae]}`` where the means are over rows where the latent fires.

    >>> acts = torch.tensor([[1., 0.], [1., 0.], [0., 2.], [0., 2.]])
    >>> s = separation_scores(acts, torch.tensor([True, True, False, False]), ["a", "a", "a", "a"])
    >>> s["known"].tolist(), s["unknown"].tolist()
    ([1.0, -1.0], [-1.0, 1.0])
    """
    known = torch.as_tensor(known, dtype=torch.bool)
    if acts.dim() != 2 or acts.shape[0] != known.shape[0] or len(types) != known.shape[0]:
        raise ValueError(f"acts must be [n, d_sae] with n == len(known) == len(types); got {tuple(acts.shape)}, "
                         f"{known.shape[0]} labels, {len(types)} types")
    fires = (acts > threshold).float()
    names = sorted(set(types))
    type_index = torch.tensor([names.index(t) for t in types])
    f_known, f_unknown = [], []
    for i, name in enumerate(names):
        rows_k, rows_u = (type_index == i) & known, (type_index == i) & ~known
        if not bool(rows_k.any()) or not bool(rows_u.any()):
            raise ValueError(f"entity type {name!r} needs known and unknown rows (has {int(rows_k.sum())} known, "
                             f"{int(rows_u.sum())} unknown)")
        f_known.append(fires[rows_k].mean(0))
        f_unknown.append(fires[rows_u].mean(0))
    fk, fu = torch.stack(f_known), torch.stack(f_unknown)

    def firing_mean(rows: torch.Tensor) -> torch.Tensor:
        a, f = acts[rows], fires[rows]
        return (a * f).sum(0) / f.sum(0).clamp_min(1)

    return {"known": (fk - fu).min(0).values, "unknown": (fu - fk).min(0).values, "types": names,
            "freq_known": fk, "freq_unknown": fu, "mean_known": firing_mean(known), "mean_unknown": firing_mean(~known)}


@torch.no_grad()
def firing_frequency(sae: SAE, rows: torch.Tensor | Iterable[torch.Tensor], *, threshold: float = FIRE_THRESHOLD,
                     batch_size: int = 4096) -> tuple[torch.Tensor, int]:
    """``(freq [d_sae], n)``: the fraction of ``n`` residual rows (``[m, d_in]``, or an iterable of such chunks,
    read one chunk at a time) on which each latent fires (``act > threshold``)."""
    chunks = [rows] if isinstance(rows, torch.Tensor) else rows
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    for chunk in chunks:
        chunk = chunk.reshape(-1, chunk.shape[-1])
        for i in range(0, chunk.shape[0], batch_size):
            counts += (encode(sae, chunk[i:i + batch_size]) > threshold).sum(0).double().cpu()
        n += chunk.shape[0]
    if n == 0:
        raise InputError("no generic tokens to measure latent firing rates on; pass generic_stores=[...] (stores "
                         "of non-entity text) or max_generic_freq=None to skip the generic-token filter")
    return (counts / n).float(), n


def generic_filter(freq: torch.Tensor, max_freq: float | None = GENERIC_MAX_FREQ) -> torch.Tensor:
    """Latents to keep: those firing on fewer than ``max_freq`` of generic tokens (sae_entities' Pile filter,
    ``< 0.02``); ``None`` keeps every latent.

    >>> generic_filter(torch.tensor([0.0, 0.019, 0.02, 0.5])).tolist()
    [True, True, False, False]
    """
    if max_freq is None:
        return torch.ones_like(freq, dtype=torch.bool)
    if not 0 < max_freq <= 1:
        raise InputError(f"max_generic_freq={max_freq}: give a fraction in (0, 1] (the paper's 0.02), or None to "
                         "skip the generic-token filter")
    return freq < max_freq


def split_entities(rows: Sequence[dict[str, Any]], heldout_fraction: float = HELDOUT_FRACTION,
                   seed: int = 0) -> list[bool]:
    """Held-out flag per row: entities (``name``; every question about one entity stays on one side) are split
    within each (known, entity type, ``group``) stratum, ``round(heldout_fraction x count)`` of them held out
    (at least one on each side), in a fixed order shuffled by ``seed``. ``heldout_fraction=0`` holds out
    nothing.

    >>> rows = [{"name": f"e{i}", "known": i % 2 == 0, "etype": "band"} for i in range(8)]
    >>> sum(split_entities(rows, 0.5, seed=0))
    4
    """
    if not 0 <= heldout_fraction < 1:
        raise InputError(f"heldout_fraction={heldout_fraction}: give a fraction in [0, 1) (0.5 as in sae_entities;"
                         " 0 = no held-out split)")
    if heldout_fraction == 0:
        return [False] * len(rows)
    strata: dict[tuple[bool, str, str], list[str]] = {}
    for r in rows:
        names = strata.setdefault((bool(r["known"]), str(r["etype"]), str(r.get("group", ""))), [])
        if r["name"] not in names:
            names.append(r["name"])
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for (known, etype, group), names in sorted(strata.items()):
        if len(names) < 2:
            raise InputError(f"only {len(names)} {'known' if known else 'unknown'} {etype!r} entity"
                             f"{f' in group {group!r}' if group else ''}: a held-out split needs at least 2 per "
                             "class, type and group; add entities or pass heldout_fraction=0")
        order = rng.permutation(sorted(names))
        k = min(len(names) - 1, max(1, round(heldout_fraction * len(names))))
        held.update(order[:k].tolist())
    return [r["name"] in held for r in rows]


def top_latents(scores: dict[str, Any], which: str = "known", n: int = 10,
                decoder_norms: torch.Tensor | None = None, *, keep: torch.Tensor | None = None,
                heldout: dict[str, Any] | None = None, generic_freq: torch.Tensor | None = None
                ) -> list[dict[str, Any]]:
    """The ``n`` latents with the highest ``which`` (``"known"``/``"unknown"``) score, as JSON-ready dicts.

    Each has ``latent``, ``score`` (on the rows ``scores`` came from: in-sample when they chose the latent),
    per-type ``freq_known``/``freq_unknown``, the mean firing activation on known and unknown rows and
    ``scale`` (mean firing activation on its own class x decoder-row norm, when ``decoder_norms`` is given):
    the suggested steering coefficient for its normalised direction. ``keep`` (bool ``[d_sae]``) leaves the
    others out of the ranking (the generic-token filter); ``heldout`` (scores of held-out rows) adds
    ``score_heldout`` and ``freq_*_heldout``; ``generic_freq`` adds each latent's firing rate on generic tokens.

    >>> top_latents(s, "unknown", n=1)[0]["latent"]                          # doctest: +SKIP
    1
    """
    if which not in ("known", "unknown"):
        raise ValueError(f"which must be 'known' or 'unknown', got {which!r}")
    ranked = scores[which] if keep is None else torch.where(keep, scores[which],
                                                            torch.full_like(scores[which], -float("inf")))
    order = torch.argsort(ranked, descending=True, stable=True)
    order = order[:min(n, int(torch.isfinite(ranked).sum()))].tolist()
    rows = []
    for j in order:
        own = scores["mean_known" if which == "known" else "mean_unknown"][j]
        row = {"latent": j, "kind": which, "score": float(scores[which][j]),
               "freq_known": {t: float(scores["freq_known"][i, j]) for i, t in enumerate(scores["types"])},
               "freq_unknown": {t: float(scores["freq_unknown"][i, j]) for i, t in enumerate(scores["types"])},
               "mean_act_known": float(scores["mean_known"][j]), "mean_act_unknown": float(scores["mean_unknown"][j])}
        if heldout is not None:
            row["score_heldout"] = float(heldout[which][j])
            row["freq_known_heldout"] = {t: float(heldout["freq_known"][i, j]) for i, t in enumerate(heldout["types"])}
            row["freq_unknown_heldout"] = {t: float(heldout["freq_unknown"][i, j])
                                           for i, t in enumerate(heldout["types"])}
        if generic_freq is not None:
            row["generic_freq"] = float(generic_freq[j])
        if decoder_norms is not None:
            row["decoder_norm"] = float(decoder_norms[j])
            row["scale"] = float(own * decoder_norms[j])
        rows.append(row)
    return rows


def random_latents(scores: dict[str, Any], which: str, n: int, *, exclude: Sequence[int] = (), seed: int = 0,
                   tol: float = 0.0) -> tuple[list[int], float]:
    """The paper's random-latent baseline: ``n`` latents drawn (``seed``) among those whose ``which`` score has
    ``|score| <= tol`` (sae_entities: exactly 0), leaving out ``exclude``. If fewer qualify, the ``n`` latents
    with the smallest ``|score|`` are used instead. Returns ``(latents, largest |score| among them)``.

    >>> random_latents({"known": torch.tensor([0.0, 0.9, 0.0, 0.0])}, "known", 2, seed=0)[1]
    0.0
    """
    score = scores[which].abs()
    allowed = torch.ones_like(score, dtype=torch.bool)
    allowed[list(exclude)] = False
    candidates = torch.nonzero(allowed & (score <= tol)).flatten()
    if len(candidates) < n:  # too few exact zeros: the closest to zero instead
        masked = torch.where(allowed, score, torch.full_like(score, float("inf")))
        candidates = torch.argsort(masked, stable=True)[:n]
        candidates = candidates[torch.isfinite(masked[candidates])]
    g = torch.Generator().manual_seed(seed)
    picked = candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
    return picked.tolist(), float(score[picked].max()) if len(picked) else float("nan")


# ------------------------------------------------------------------------------------------- directions
def latent_direction(sae: SAE, latent: int) -> torch.Tensor:
    """Unit-norm decoder row ``W_dec[latent] / ||W_dec[latent]||`` (``[d_in]``, float32, CPU)."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise SAEError(f"latent {latent} out of range; this SAE has {sae.cfg.d_sae} latents")
    row = sae.W_dec[latent].detach().float().cpu()
    return row / row.norm().clamp_min(1e-12)


def latent_vector(sae: SAE, latent: int, *, scale: float = 1.0, model: Any = None,
                  provenance: dict[str, Any] | None = None) -> Any:
    """A :class:`~haltrace.steering.vector.SteeringVector` (method ``"sae"``) for one latent.

    The direction is unit norm; ``alpha`` = ``scale`` (e.g. the ``scale`` from :func:`top_latents`).

    >>> latent_vector(sae, 17, scale=3.2).save("vectors/known-latent")       # doctest: +SKIP
    """
    from haltrace.steering.vector import SteeringVector

    hook = sae_hook(sae)
    point = parse_hook(hook)
    if point.layer is None:
        raise SAEError(f"SAE hook {hook!r} has no layer; steering vectors need a layer hook")
    meta = sae.cfg.metadata
    info = {"sae_latent": latent, "sae_hook_name": meta.get("hook_name"), "sae_d_sae": sae.cfg.d_sae,
            "sae_architecture": sae.cfg.architecture(), "scale_rule": "mean firing activation x ||W_dec row||",
            **(provenance or {})}
    return SteeringVector(direction=latent_direction(sae, latent), layers=[point.layer], hidden_size=sae.cfg.d_in,
                          hook=point.kind, alpha=float(scale), positions="all", phase="prompt", method="sae",
                          model=str(getattr(model, "name_or_path", "") or meta.get("model_name") or ""),
                          n_layers=getattr(model, "n_layers", None), provenance=info)


# ------------------------------------------------------------------------------------------ entity data
def entity_spans(tokenizer: Any, prompts: Sequence[str], names: Sequence[str]) -> list[tuple[int, int]]:
    """``(first, last)`` token index of each entity name in the *unpadded* tokenisation of its prompt.

    Uses the fast tokenizer's character offsets, so it works for word-level and subword tokenizers alike.

    >>> entity_spans(model.tokenizer, ["where does the band zomi live ?"], ["zomi"])   # doctest: +SKIP
    [(5, 5)]
    """
    out = []
    for prompt, name in zip(prompts, names, strict=True):
        match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", prompt)  # the whole word, not a substring
        if match is None:
            raise ValueError(f"entity {name!r} does not occur in prompt {prompt!r}")
        start, end = match.span()
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
        if not hits:
            raise ValueError(f"no token of {prompt!r} covers the entity {name!r}")
        out.append((hits[0], hits[-1]))
    return out


def entity_positions(tokenizer: Any, prompts: Sequence[str], names: Sequence[str]) -> list[int]:
    """Index of the last token of each entity name in the *unpadded* tokenisation of its prompt.

    >>> entity_positions(model.tokenizer, ["where does the band zomi live ?"], ["zomi"])   # doctest: +SKIP
    [5]
    """
    return [last for _, last in entity_spans(tokenizer, prompts, names)]


def entity_activations(store: Any, hook: str, positions: Sequence[int]) -> torch.Tensor:
    """``[n, d]`` activations at each row's entity token from a ``positions="all"`` (ragged) store."""
    if not store.is_ragged(hook):
        raise SAEError(f"store {store.root} holds {hook!r} at positions={store.positions!r}; entity scoring needs "
                       "positions='all' (it picks the entity token of each row)")
    lengths = store.lengths()
    if len(positions) != lengths.shape[0]:
        raise SAEError(f"store {store.root} has {lengths.shape[0]} rows, expected {len(positions)} entity questions")
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    if bool((pos >= lengths).any()):
        raise SAEError("an entity position lies past its prompt's end; the store was harvested from other prompts")
    return store.load(hook)[starts + pos].float()


def store_token_rows(store: Any, hook: str, chunk: int = 256) -> Iterator[torch.Tensor]:
    """Every stored token row of ``hook`` (``[tokens, d]`` chunks of ``chunk`` examples): the generic-token set
    when ``store`` holds non-entity prompts (e.g. the organism's image questions)."""
    if hook not in store.hooks:
        raise InputError(f"generic store {store.root} has no hook {hook!r} (it holds {store.hooks}); harvest "
                         f"{hook!r} there, or pass other generic stores")
    for block in store.iter_batches(hook, chunk):
        yield block.reshape(-1, block.shape[-1]).float()


def pre_entity_rows(store: Any, hook: str, firsts: Sequence[int]) -> torch.Tensor:
    """``[m, d]``: the tokens before each entity's first token in a ``positions="all"`` store. A causal model
    computes them without seeing the entity, so they are non-entity tokens of the same prompts."""
    lengths = store.lengths()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    idx = torch.cat([starts[i] + torch.arange(int(first)) for i, first in enumerate(firsts)])
    return store.load(hook)[idx].float()


# ----------------------------------------------------------------------------------------------- steering
def _module_for(model: Any, hook: str) -> tuple[torch.nn.Module, bool]:
    """(module, is_pre_hook) where adding to ``hook`` happens."""
    point = parse_hook(hook, model.n_layers, vision=model.is_vlm)
    adapter = model.adapter
    if point.kind == "resid_pre":
        return adapter.layers[point.layer], True
    if point.kind == "resid_post":
        return adapter.layers[point.layer], False
    if point.kind == "attn_out":
        return adapter.attention(point.layer), False
    if point.kind == "mlp_out":
        return adapter.mlp(point.layer), False
    raise SAEError(f"steering at {hook!r} is not supported here; use resid_pre/resid_post/attn_out/mlp_out")


@torch.no_grad()
def steered_answers(model: Any, prompts: Sequence[str], positions: Sequence[int], hook: str,
                    direction: torch.Tensor | None, coef: float = 0.0, *, batch_size: int = 64) -> list[str]:
    """Greedy next token after each prompt with ``coef * direction`` added to ``hook`` at unpadded token
    ``positions[i]`` and every later prompt token (hooks removed afterwards, also on error).

    >>> steered_answers(model, prompts, pos, "resid_post.2", d, 8.0)        # doctest: +SKIP
    ['unknown', 'unknown', ...]
    """
    from haltrace.trace.capture import temporary_hooks

    module, pre = _module_for(model, hook)
    state: dict[str, torch.Tensor | None] = {"add": None}

    def add(x: torch.Tensor) -> torch.Tensor:
        delta = state["add"]
        return x if delta is None else x + delta.to(x.dtype)

    def pre_hook(_m: Any, args: tuple, kwargs: dict) -> Any:
        if args:
            return (add(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = add(kwargs["hidden_states"])
        return args, kwargs

    def post_hook(_m: Any, _a: tuple, _kw: dict, out: Any) -> Any:
        if isinstance(out, tuple):
            return (add(out[0]), *out[1:])
        return add(out)

    hooks = {"pre": [(module, pre_hook)]} if pre else {"forward": [(module, post_hook)]}
    answers: list[str] = []
    tok = model.tokenizer
    with temporary_hooks(**hooks, with_kwargs=True):
        for i in range(0, len(prompts), batch_size):
            inputs = model.prepare(list(prompts[i:i + batch_size]))
            mask = inputs["attention_mask"]
            seq = mask.shape[1]
            pad = seq - mask.sum(1)  # left padding: real tokens start at pad[b]
            start = pad + torch.as_tensor(list(positions[i:i + batch_size]), device=mask.device)
            steer = (torch.arange(seq, device=mask.device)[None, :] >= start[:, None]).float()
            state["add"] = (None if direction is None or coef == 0 else
                            coef * steer[:, :, None] * direction.to(model.device)[None, None, :])
            logits = model.hf(**inputs).logits[:, -1]
            answers += [tok.decode([int(t)]).strip() for t in logits.argmax(-1)]
            state["add"] = None
    return answers


def refusal_curve(model: Any, prompts: Sequence[str], positions: Sequence[int], hook: str, direction: torch.Tensor,
                  coefs: Sequence[float], *, refusal_word: str = "unknown", batch_size: int = 64) -> list[float]:
    """Refusal rate (answer == ``refusal_word``) at each coefficient of :func:`steered_answers`."""
    return [sum(a == refusal_word for a in steered_answers(model, prompts, positions, hook, direction, c,
                                                           batch_size=batch_size)) / len(prompts)
            for c in coefs]


def random_directions(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` random unit directions (the baseline of the same norm as a unit latent direction)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------ the whole task
def entity_dataset(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows' harvest layout. One fixed layout, so an SAE-training harvest and the scoring harvest of the same
    questions share a store (same fingerprint)."""
    return [{"prompt": r["prompt"], "group": r["group"], "name": r["name"], "etype": r["etype"], "key": r.get("key")}
            for r in rows]


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        raise InputError("no entity questions given; pass rows with keys " + ", ".join(ROW_KEYS))
    missing = [k for k in ROW_KEYS if k not in rows[0]]
    if missing:
        raise InputError(f"entity rows need the keys {', '.join(ROW_KEYS)}; the first row lacks {missing} (the "
                         "organism's come from haltrace.probes.sae_cli.organism_entity_rows)")


def _unknown_groups(rows: Sequence[dict[str, Any]], unknown: str | Sequence[str]) -> tuple[str, ...]:
    present = sorted({r["group"] for r in rows if not r["known"]})
    if isinstance(unknown, str):
        chosen = tuple(present) if unknown in ("both", "all") else (unknown,)
    else:
        chosen = tuple(unknown)
    bad = [g for g in chosen if g not in present]
    if bad or not chosen:
        raise InputError(f"unknown group(s) {bad or chosen} not among the unknown entities' groups {present}; "
                         "choose one of those, or 'both'")
    return chosen


def score_entity_latents(sae: SAE, model: Any, rows: Sequence[dict[str, Any]], *, store: str | Path,
                         unknown: str | Sequence[str] = "unknown_train", top: int = 10,
                         generic_stores: Sequence[Any] = (), max_generic_freq: float | None = GENERIC_MAX_FREQ,
                         heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0,
                         progress: bool = False) -> dict[str, Any]:
    """Harvest (or reuse) entity-token activations, drop generic latents, rank latents on the selection
    entities and score them again on held-out entities; a JSON-ready result (``_``-keys hold tensors).

    Args:
        rows: entity questions, dicts with ``prompt``, ``name`` (the entity, as written in the prompt),
            ``etype``, ``known`` (bool) and ``group`` (e.g. the organism's ``known`` / ``unknown_train`` /
            ``unknown_heldout``); optional ``key``.
        store: folder of the entity store (``positions="all"``), created or reused.
        unknown: the unknown group(s) contrasted with the known entities, or ``"both"`` for all of them.
        generic_stores: stores (or folders) of non-entity prompts holding the SAE's hook: the generic tokens of
            the filter. Empty: the tokens before each entity in its own question.
        max_generic_freq: drop latents firing on this fraction of generic tokens or more (0.02 as in the
            paper); ``None`` skips the filter.
        heldout_fraction / seed: the entity split (:func:`split_entities`).

    The result's ``known`` / ``unknown`` lists hold ``score`` (in-sample: on the selection entities the latents
    were ranked on) and ``score_heldout`` (the same score on held-out entities); ``generic_filter`` says how
    many latents the filter dropped, overall and among the top ``top`` of each kind.
    """
    from haltrace.trace.harvest import harvest
    from haltrace.trace.store import ActivationStore

    _check_rows(rows)
    hook = check_sae_fits(sae, model)
    spans = entity_spans(model.tokenizer, [r["prompt"] for r in rows], [r["name"] for r in rows])
    positions = [last for _, last in spans]
    store_obj = harvest(model, entity_dataset(rows), [hook], positions="all", out=store, progress=progress)
    resid = entity_activations(store_obj, hook, positions)
    acts = encode(sae, resid)
    groups = _unknown_groups(rows, unknown)
    contrast = torch.tensor([bool(r["known"]) or r["group"] in groups for r in rows])
    held = torch.tensor(split_entities(rows, heldout_fraction, seed))
    known = torch.tensor([bool(r["known"]) for r in rows])
    types = [r["etype"] for r in rows]

    def scores_on(mask: torch.Tensor) -> dict[str, Any]:
        idx = torch.nonzero(mask).flatten().tolist()
        return separation_scores(acts[idx], known[idx], [types[i] for i in idx])

    select, evaluate = contrast & ~held, contrast & held
    scores = scores_on(select)
    heldout = scores_on(evaluate) if bool(evaluate.any()) else None
    # the generic-token filter
    if max_generic_freq is None:
        keep, freq, n_generic, source = torch.ones(sae.cfg.d_sae, dtype=torch.bool), None, 0, "none (filter off)"
    else:
        if generic_stores:
            opened = [s if isinstance(s, ActivationStore) else ActivationStore.open(s) for s in generic_stores]
            tokens: Any = (chunk for s in opened for chunk in store_token_rows(s, hook))
            source = "all tokens of " + ", ".join(str(s.root) for s in opened)
        else:
            tokens = pre_entity_rows(store_obj, hook, [first for first, _ in spans])
            source = f"the tokens before each entity in its question ({store_obj.root})"
        freq, n_generic = firing_frequency(sae, tokens)
        keep = generic_filter(freq, max_generic_freq)
    norms = sae.W_dec.detach().float().norm(dim=1).cpu()
    unfiltered = {w: top_latents(scores, w, top) for w in ("known", "unknown")}
    names_sel = {r["name"] for r, m in zip(rows, select.tolist(), strict=True) if m}
    names_ev = {r["name"] for r, m in zip(rows, evaluate.tolist(), strict=True) if m}
    return {"hook": hook, "sae_hook_name": sae.cfg.metadata.get("hook_name"), "store": str(store),
            "n_known": int((select & known).sum()), "n_unknown": int((select & ~known).sum()),
            "unknown_group": unknown if isinstance(unknown, str) else list(unknown), "types": scores["types"],
            "entity_token_norm": float(resid.norm(dim=-1).mean()),  # for scale: coefficients vs ||x||
            "scores": {"score": "in-sample: separation score on the selection entities the latents were ranked on",
                       "score_heldout": "held-out: the same score on entities not used for ranking"},
            "split": {"seed": seed, "heldout_fraction": heldout_fraction, "by": "entity, per class, type and group",
                      "selection": {"rows": int(select.sum()), "entities": len(names_sel),
                                    "known_rows": int((select & known).sum())},
                      "heldout": {"rows": int(evaluate.sum()), "entities": len(names_ev),
                                  "known_rows": int((evaluate & known).sum())}},
            "generic_filter": {"max_freq": max_generic_freq, "source": source, "n_tokens": n_generic,
                               "dropped": int((~keep).sum()), "d_sae": sae.cfg.d_sae,
                               "dropped_from_top": {w: sum(not bool(keep[r["latent"]]) for r in unfiltered[w])
                                                    for w in unfiltered}},
            "known": top_latents(scores, "known", top, norms, keep=keep, heldout=heldout, generic_freq=freq),
            "unknown": top_latents(scores, "unknown", top, norms, keep=keep, heldout=heldout, generic_freq=freq),
            "_acts": acts, "_rows": list(rows), "_positions": positions, "_heldout": held.tolist(),
            "_selection": select.tolist(), "_scores": scores}


def _curve_set(model: Any, rows: Sequence[dict[str, Any]], positions: Sequence[int], idx: Sequence[int], hook: str,
               directions: torch.Tensor, coefs: Sequence[float], refusal_word: str) -> torch.Tensor:
    """``[len(directions), len(coefs)]`` refusal rates on rows ``idx``."""
    prompts, pos = [rows[i]["prompt"] for i in idx], [positions[i] for i in idx]
    return torch.tensor([refusal_curve(model, prompts, pos, hook, d, coefs, refusal_word=refusal_word)
                         for d in directions])


def _change(curves: torch.Tensor, sign: float) -> torch.Tensor:
    """Per curve: the largest change from coefficient 0 in the intended direction, in points."""
    return 100 * sign * (sign * (curves - curves[:, :1])).max(1).values


def entity_refusal_experiment(sae: SAE, model: Any, result: dict[str, Any], *,
                              multiples: Sequence[float] = (0, 0.25, 0.5, 1, 2), unit: str = "norm",
                              n_random: int = 5, n_random_latents: int = 5, refusal_word: str = "unknown",
                              known_latent_target: str | None = "unknown_heldout", seed: int = 0) -> dict[str, Any]:
    """Steer with the top latents of :func:`score_entity_latents` and measure refusal rates on held-out entities.

    The unknown latent's direction is added on **held-out known** entities (refusal should rise); the known
    latent's on unknown entities of group ``known_latent_target`` (``None``: every unknown group) that were not
    used to rank it (refusal should fall). ``refusal_in_sample`` repeats the curve on the selection entities of
    the same class (those the latent was chosen on), for comparison. Coefficients are ``multiples x unit``:
    ``unit="norm"`` is the mean residual norm at the entity token (the same coefficients for every latent),
    ``"scale"`` the latent's own suggested scale. Baselines at the same coefficients on the same rows:
    ``n_random`` random unit Gaussian directions (``random_*``) and ``n_random_latents`` random latents of the
    SAE whose in-sample score is 0 (``random_latents_*``, the paper's baseline), each as mean ± sd.

    >>> exp = entity_refusal_experiment(sae, model, result)                   # doctest: +SKIP
    >>> exp["unknown_latent_on_known"]["refusal"]                             # doctest: +SKIP
    [0.0, 0.02, 0.4, 0.97, 1.0]
    """
    if unit not in ("norm", "scale"):
        raise InputError(f"unit must be 'norm' or 'scale' (--coef-unit), got {unit!r}")
    rows, positions = result["_rows"], result["_positions"]
    selection, held = result["_selection"], result["_heldout"]
    hook = result["hook"]
    out: dict[str, Any] = {"hook": hook, "positions": "entity_last_to_end (prompt pass only)",
                           "refusal_word": refusal_word, "multiples": list(multiples), "unit": unit,
                           "entity_token_norm": result["entity_token_norm"], "split_seed": result["split"]["seed"]}
    for which in ("known", "unknown"):
        if not result[which]:
            continue
        best = result[which][0]
        sign = -1.0 if which == "known" else 1.0
        if which == "unknown":
            target_name, description = "known", "held-out known entities (not used to rank the latent)"
            idx = [i for i, r in enumerate(rows) if r["known"] and held[i]]
            in_sample = [i for i, r in enumerate(rows) if r["known"] and selection[i]]
        else:
            target_name = known_latent_target or "unknown"
            description = (f"unknown entities{f' of group {known_latent_target}' if known_latent_target else ''} "
                           "not used to rank the latent")
            idx = [i for i, r in enumerate(rows) if not r["known"] and not selection[i]
                   and (known_latent_target is None or r["group"] == known_latent_target)]
            in_sample = [i for i, r in enumerate(rows) if not r["known"] and selection[i]]
        if not idx:
            raise InputError(f"no {description} to steer the {which} latent on: use a held-out split "
                             "(heldout_fraction > 0) or another known_latent_target")
        base = result["entity_token_norm"] if unit == "norm" else best["scale"]
        coefs = [m * base for m in multiples]
        direction = latent_direction(sae, best["latent"])[None]
        curve = _curve_set(model, rows, positions, idx, hook, direction, coefs, refusal_word)
        curve_in = (_curve_set(model, rows, positions, in_sample, hook, direction, coefs, refusal_word)
                    if in_sample else None)
        gauss = _curve_set(model, rows, positions, idx, hook, random_directions(sae.cfg.d_in, n_random, seed),
                           coefs, refusal_word) if n_random else torch.empty(0, len(coefs))
        picked, max_abs = random_latents(result["_scores"], which, n_random_latents, exclude=[best["latent"]],
                                         seed=seed)
        lat_dirs = torch.stack([latent_direction(sae, j) for j in picked]) if picked else torch.empty(0, sae.cfg.d_in)
        lat = (_curve_set(model, rows, positions, idx, hook, lat_dirs, coefs, refusal_word) if picked
               else torch.empty(0, len(coefs)))
        exp = {
            "latent": best["latent"], "score": best["score"], "score_heldout": best.get("score_heldout"),
            "scale": best["scale"], "target": description, "n": len(idx), "coefs": coefs,
            "refusal": curve[0].tolist(),
            "refusal_in_sample": curve_in[0].tolist() if curve_in is not None else None, "n_in_sample": len(in_sample),
            # change in the intended direction: the known latent lowers refusal, the unknown latent raises it
            "change_points": float(_change(curve, sign)[0]),
            "change_points_in_sample": float(_change(curve_in, sign)[0]) if curve_in is not None else None,
            "random_mean": gauss.mean(0).tolist() if n_random else None,
            "random_std": gauss.std(0, unbiased=False).tolist() if n_random else None,
            "random_change_points": float(_change(gauss, sign).mean()) if n_random else None,
            "random_latents": picked, "random_latents_max_abs_score": max_abs,
            "random_latents_mean": lat.mean(0).tolist() if picked else None,
            "random_latents_std": lat.std(0, unbiased=False).tolist() if picked else None,
            "random_latents_change_points": float(_change(lat, sign).mean()) if picked else None,
            "random_latents_change_points_std": float(_change(lat, sign).std(unbiased=False)) if picked else None,
        }
        out[f"{which}_latent_on_{target_name}"] = exp
    return out
