"""Entity-recognition SAE latents (Ferrando et al. 2025): separation scores, latent directions, refusal steering.

Activations are taken at the last token of the entity name in text-only questions. For each latent ``j`` the
activation frequency ``f[j] = mean 1[a_j > 1e-6]`` is computed on known and on unknown entities; the
*known* score is ``f_known - f_unknown`` and the *unknown* score its negative, each the **minimum over entity
types** (a latent must separate players and bands alike). A latent's steering direction is its decoder row,
normalised, with ``typical activation x ||W_dec[j]||`` as the suggested coefficient (the residual-stream size
of the latent's own contribution when it fires).

Steering for the refusal measurement adds ``coef * direction`` to the hook's output at the entity's last
token and every later prompt token, in the prompt forward pass only (the answer is one greedy token).

Example
-------
>>> scores = separation_scores(acts, known, etypes)                         # doctest: +SKIP
>>> top = top_latents(scores, "known", n=5)                                 # doctest: +SKIP
>>> vec = latent_vector(sae, top[0]["latent"], scale=top[0]["scale"])      # doctest: +SKIP
>>> refusal_curve(model, prompts, positions, "resid_post.2", vec.direction, [0, 4, 8])   # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from haltrace.conventions import parse_hook
from haltrace.probes.sae import SAEError, check_sae_fits, encode, sae_hook

if TYPE_CHECKING:
    from sae_lens import SAE

FIRE_THRESHOLD = 1e-6  # as in sae_entities: a latent "fires" above this
ENTITY_GROUPS = ("known", "unknown_train", "unknown_heldout")


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


def top_latents(scores: dict[str, Any], which: str = "known", n: int = 10,
                decoder_norms: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """The ``n`` latents with the highest ``which`` (``"known"``/``"unknown"``) score, as JSON-ready dicts.

    Each has ``latent``, ``score``, per-type ``freq_known``/``freq_unknown``, the mean firing activation on
    known and unknown rows and ``scale`` (mean firing activation on its own class x decoder-row norm, when
    ``decoder_norms`` is given): the suggested steering coefficient for its normalised direction.

    >>> top_latents(s, "unknown", n=1)[0]["latent"]                          # doctest: +SKIP
    1
    """
    if which not in ("known", "unknown"):
        raise ValueError(f"which must be 'known' or 'unknown', got {which!r}")
    order = torch.argsort(scores[which], descending=True, stable=True)[:n].tolist()
    rows = []
    for j in order:
        own = scores["mean_known" if which == "known" else "mean_unknown"][j]
        row = {"latent": j, "kind": which, "score": float(scores[which][j]),
               "freq_known": {t: float(scores["freq_known"][i, j]) for i, t in enumerate(scores["types"])},
               "freq_unknown": {t: float(scores["freq_unknown"][i, j]) for i, t in enumerate(scores["types"])},
               "mean_act_known": float(scores["mean_known"][j]), "mean_act_unknown": float(scores["mean_unknown"][j])}
        if decoder_norms is not None:
            row["decoder_norm"] = float(decoder_norms[j])
            row["scale"] = float(own * decoder_norms[j])
        rows.append(row)
    return rows


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
def entity_rows(world: Any, groups: Sequence[str] = ENTITY_GROUPS) -> list[dict[str, Any]]:
    """One dict per entity question of the organism: ``prompt``, ``group``, ``known``, ``name``, ``etype``, ``key``,
    ``target``. ``groups`` picks among known / unknown_train / unknown_heldout."""
    from haltrace.organism.tasks import entity_sets

    sets = entity_sets(world)
    bad = [g for g in groups if g not in sets]
    if bad:
        raise ValueError(f"unknown entity groups {bad}; choose from {list(sets)}")
    return [{"prompt": ex.prompt, "group": g, "known": g == "known", "target": ex.target, **ex.meta}
            for g in groups for ex in sets[g]]


def entity_positions(tokenizer: Any, prompts: Sequence[str], names: Sequence[str]) -> list[int]:
    """Index of the last token of each entity name in the *unpadded* tokenisation of its prompt.

    Uses the fast tokenizer's character offsets, so it works for word-level and subword tokenizers alike.

    >>> entity_positions(model.tokenizer, ["where does the band zomi live ?"], ["zomi"])   # doctest: +SKIP
    [5]
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
        out.append(hits[-1])
    return out


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
def _entity_dataset(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # one fixed layout, so the SAE-training harvest and the scoring harvest share a store (same fingerprint)
    return [{"prompt": r["prompt"], "group": r["group"], "name": r["name"], "etype": r["etype"], "key": r["key"]}
            for r in rows]


def harvest_organism_sae_data(model: Any, world: Any, hook: str, root: str | Path, *,
                              progress: bool = False) -> list[Any]:
    """Stores to train an organism SAE on, every token position of: the 288 entity questions (text) and
    ~1,000 image questions (POPE random split: 300 images x 2 questions; 200 counterfactual-colour and 200
    caption prompts). Returns ``[entity_store, image_store]`` under ``root/entity`` and ``root/image``.

    Image tokens precede the question, so each image is used by few prompts: more images, fewer repeats.

    >>> stores = harvest_organism_sae_data(model, world, "resid_post.2", "acts/")   # doctest: +SKIP
    """
    from PIL import Image

    import haltrace
    from haltrace.organism import tasks

    root = Path(root)
    entity = haltrace.harvest(model, _entity_dataset(entity_rows(world)), [hook], positions="all",
                              out=root / "entity", progress=progress)
    examples = (tasks.pope_sets(world)["random"] + tasks.counterfactual_colour_set(world)
                + tasks.caption_set(world))
    images = [{"prompt": ex.full_prompt, "image": Image.fromarray(ex.image)} for ex in examples]
    image = haltrace.harvest(model, images, [hook], positions="all", out=root / "image", batch_size=64,
                             progress=progress)
    return [entity, image]


def score_entity_latents(sae: SAE, model: Any, world: Any, *, store: str | Path, unknown: str = "unknown_train",
                         top: int = 10, progress: bool = False) -> dict[str, Any]:
    """Harvest (or reuse) entity-token activations, encode them and rank latents; JSON-ready result.

    ``unknown`` picks which unknown group the scores contrast with the known entities (``unknown_train``,
    ``unknown_heldout`` or ``both``); the other groups are harvested too, so one store serves every choice.
    """
    import haltrace

    hook = check_sae_fits(sae, model)
    rows = entity_rows(world)
    positions = entity_positions(model.tokenizer, [r["prompt"] for r in rows], [r["name"] for r in rows])
    store_obj = haltrace.harvest(model, _entity_dataset(rows), [hook], positions="all", out=store,
                                 progress=progress)
    resid = entity_activations(store_obj, hook, positions)
    acts = encode(sae, resid)
    groups = {"unknown_train": ("unknown_train",), "unknown_heldout": ("unknown_heldout",),
              "both": ("unknown_train", "unknown_heldout")}
    if unknown not in groups:
        raise ValueError(f"unknown must be one of {list(groups)}, got {unknown!r}")
    keep = torch.tensor([r["known"] or r["group"] in groups[unknown] for r in rows])
    kept = [r for r, k in zip(rows, keep.tolist(), strict=True) if k]
    scores = separation_scores(acts[keep], torch.tensor([r["known"] for r in kept]), [r["etype"] for r in kept])
    norms = sae.W_dec.detach().float().norm(dim=1).cpu()
    return {"hook": hook, "sae_hook_name": sae.cfg.metadata.get("hook_name"), "store": str(store),
            "n_known": sum(r["known"] for r in kept), "n_unknown": sum(not r["known"] for r in kept),
            "unknown_group": unknown, "types": scores["types"],
            "entity_token_norm": float(resid.norm(dim=-1).mean()),  # for scale: coefficients vs ||x||
            "known": top_latents(scores, "known", top, norms), "unknown": top_latents(scores, "unknown", top, norms),
            "_acts": acts, "_rows": rows, "_positions": positions}


def entity_refusal_experiment(sae: SAE, model: Any, result: dict[str, Any], *,
                              multiples: Sequence[float] = (0, 0.25, 0.5, 1, 2), unit: str = "norm",
                              n_random: int = 5, refusal_word: str = "unknown", seed: int = 0) -> dict[str, Any]:
    """Steer with the top latents of :func:`score_entity_latents` and measure refusal rates.

    The known latent's direction is added on held-out unknown entities (refusal should fall), the unknown
    latent's on known entities (refusal should rise), at coefficients ``multiples x unit``: ``unit="norm"``
    is the mean residual norm at the entity token (the same coefficients for every latent), ``"scale"`` the
    latent's own suggested scale. ``n_random`` random unit directions at the same coefficients are the
    baseline (same norm as the unit latent direction).

    >>> exp = entity_refusal_experiment(sae, model, result)                   # doctest: +SKIP
    >>> exp["unknown_latent_on_known"]["refusal"]                             # doctest: +SKIP
    [0.0, 0.02, 0.4, 0.97, 1.0]
    """
    if unit not in ("norm", "scale"):
        raise ValueError(f"unit must be 'norm' or 'scale', got {unit!r}")
    rows, positions = result["_rows"], result["_positions"]
    hook = result["hook"]
    out: dict[str, Any] = {"hook": hook, "positions": "entity_last_to_end (prompt pass only)",
                           "refusal_word": refusal_word, "multiples": list(multiples), "unit": unit,
                           "entity_token_norm": result["entity_token_norm"]}
    for which, target in (("known", "unknown_heldout"), ("unknown", "known")):
        if not result[which]:
            continue
        best = result[which][0]
        sign = -1.0 if which == "known" else 1.0
        idx = [i for i, r in enumerate(rows) if r["group"] == target]
        prompts, pos = [rows[i]["prompt"] for i in idx], [positions[i] for i in idx]
        base = result["entity_token_norm"] if unit == "norm" else best["scale"]
        coefs = [m * base for m in multiples]
        curve = refusal_curve(model, prompts, pos, hook, latent_direction(sae, best["latent"]), coefs,
                              refusal_word=refusal_word)
        rand = torch.tensor([refusal_curve(model, prompts, pos, hook, d, coefs, refusal_word=refusal_word)
                             for d in random_directions(sae.cfg.d_in, n_random, seed)])
        out[f"{which}_latent_on_{target}"] = {
            "latent": best["latent"], "score": best["score"], "scale": best["scale"], "n": len(prompts),
            "coefs": coefs, "refusal": curve,
            "random_mean": rand.mean(0).tolist(), "random_std": rand.std(0, unbiased=False).tolist(),
            # change in the intended direction: the known latent lowers refusal, the unknown latent raises it
            "change_points": 100 * sign * max(sign * (c - curve[0]) for c in curve),
            "random_change_points": (100 * sign * float((sign * (rand - rand[:, :1])).max(1).values.mean())
                                     if n_random else None),
        }
    return out
