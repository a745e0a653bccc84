"""Where an organism's hallucination lives, measured without any steering method.

Three checks on the held-out caption set (every image shows an anchor whose pair partner is absent; the partner
is the object the co-occurrence prior makes the model name) and one on POPE:

* **Oracle erasure** (:func:`oracle_erasure`): the *true* absent partner's text direction is erased from the image
  tokens (ProjectAway's positive-projection removal, :func:`haltrace.steering.erasure.erase`) at one decoder
  layer, no detector involved. If the partner prior is carried by the image tokens (in the language model's word
  space), CHAIR_i falls; if it lives in the language model, nothing moves. Swept over a declared grid
  (:func:`text_reps` x layer x :data:`WEIGHTS`); the best cell whose recall falls by at most 5 points is the bound a
  detector-driven method (ProjectAway) could reach on this organism.
* **Present-object removal** (:func:`present_removal`): the paper's removal experiment. For each image, one object
  the unedited caption names *and* the image shows is erased the same way; the rate is the fraction of captions
  that stop naming it (best cell of the same grid).
* **Internal confidence over the image tokens** (:func:`internal_confidence_auroc`): ProjectAway's ``c_o`` (logit
  lens over every layer and image position, top-50 renormalised) for each present object and for the absent
  partner; the AUROC says how well it separates them (1.0: every present object above every absent partner).
* **Attention to the image by answer** (:func:`attention_by_answer`): on POPE's adversarial split, the share of
  attention the last prompt token pays to the image tokens (mean over heads; per layer and overall), for correct
  "yes", hallucinated "yes" and correct "no" answers.

Everything goes through haltrace's generic runtime (the steering engine, :mod:`haltrace.trace`), so the same
code runs on both organism architectures. :func:`measure_mechanism` runs them all; ``haltrace organism eval``
adds the result to its report under ``mechanism`` and the model card prints it.

>>> report = measure_mechanism(haltrace.load("shapes-llava-staged", attn_implementation="eager"))  # doctest: +SKIP
>>> report["oracle_erasure"]["best"]["chair_i_change"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from haltrace.data.chair import chair_metrics
from haltrace.metrics import auroc_score
from haltrace.organism import tasks
from haltrace.organism.phenomena import OrganismRunner
from haltrace.organism.tasks import Example
from haltrace.steering.erasure import ProjectAwayEdit, internal_confidence, mentions, text_representations

#: the declared grid of the oracle checks: text representations, weights (within the paper's ablation range,
#: 0.5 to 15, plus 16); every decoder layer l_I. The text representations are the paper's (the ``<bos> word``
#: state at ``resid_post.l_T``, every l_T: :func:`text_reps`), its "layer -1" input embedding, and the
#: unembedding row (a haltrace extra)
TEXT_REPS = ("embed", "unembed")
WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0)


def text_reps(model: Any) -> list[str]:
    """Every text representation of the grid: ``embed``, ``unembed``, then ``resid_post.0`` .. ``resid_post.n-1``."""
    return [*TEXT_REPS, *(f"resid_post.{k}" for k in range(model.n_layers))]
#: a cell counts for the oracle bound only if recall falls by at most this much (ProjectAway's own guard)
MAX_RECALL_DROP = 0.05


class ErasePlanted(ProjectAwayEdit):
    """ProjectAway's image-token erasure with the objects given, no detection: every row of every prompt has all
    of ``objects`` erased (the oracle). Same edit as the method (:func:`~haltrace.steering.erasure.erase` at
    ``resid_post.l`` on the image tokens of the prompt's forward)."""

    def prepare(self, model: Any, ctx: Any) -> None:
        self._select = None
        if ctx.ids is None or ctx.image is None or not bool(ctx.image.any()):
            return
        self._select = torch.ones(ctx.ids.shape[0], len(self.objects), dtype=torch.bool)


def _captions_erasing(model: Any, runner: OrganismRunner, groups: dict[str, list[int]], examples: Sequence[Example],
                      directions: dict[str, torch.Tensor], layer: int, weight: float) -> list[str]:
    """Captions of ``examples``; the rows of ``groups[word]`` are captioned with ``word`` erased."""
    from haltrace.steering.engine import steer

    out: list[str] = [""] * len(examples)
    for word, rows in groups.items():
        edit = ErasePlanted(f"resid_post.{layer}", directions[word][None], objects=[word], weight=weight)
        with steer(model, edit):
            caps = runner.captions([examples[i] for i in rows])
        for i, c in zip(rows, caps, strict=True):
            out[i] = c
    return out


def _chair(runner: OrganismRunner, captions: Sequence[str], examples: Sequence[Example]) -> dict:
    m = chair_metrics(captions, [e.scene.kinds for e in examples], vocabulary=runner.world.config.kinds)
    return {"chair_i": m["chair_i"], "chair_s": m["chair_s"], "recall": m["recall"]}


def partner_groups(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Row indices of the caption set grouped by their absent partner (the oracle's erased word)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.meta["absent_partner"], []).append(i)
    return groups


def present_groups(runner: OrganismRunner, examples: Sequence[Example], baseline: Sequence[str]
                   ) -> dict[str, list[int]]:
    """Row indices grouped by the present object to remove: the first kind (world order) that the image shows
    and the unedited caption names; rows whose caption names no present object are left out."""
    kinds = runner.world.config.kinds
    groups: dict[str, list[int]] = {}
    for i, (e, cap) in enumerate(zip(examples, baseline, strict=True)):
        named = set(mentions(cap, kinds))
        target = next((k for k in kinds if k in e.scene.kinds and k in named), None)
        if target is not None:
            groups.setdefault(target, []).append(i)
    return groups


def erasure_cell(model: Any, runner: OrganismRunner, examples: Sequence[Example], groups: dict[str, list[int]],
                 text_rep: str, layer: int, weight: float) -> list[str]:
    """Captions of ``examples`` with each group's word erased from its rows' image tokens (one grid cell)."""
    reps = text_representations(model, sorted(groups), text_rep)
    directions = {w: reps[i] for i, w in enumerate(sorted(groups))}
    return _captions_erasing(model, runner, groups, examples, directions, layer, weight)


def oracle_cell(model: Any, runner: OrganismRunner, examples: Sequence[Example], text_rep: str, layer: int,
                weight: float) -> dict:
    """CHAIR_i / CHAIR_s / recall with the true absent partner erased at one cell."""
    caps = erasure_cell(model, runner, examples, partner_groups(examples), text_rep, layer, weight)
    return _chair(runner, caps, examples)


def removal_cell(model: Any, runner: OrganismRunner, examples: Sequence[Example], baseline: Sequence[str],
                 text_rep: str, layer: int, weight: float) -> float:
    """Fraction of captions that stop naming their erased present object at one cell."""
    groups = present_groups(runner, examples, baseline)
    targets = {i: w for w, rows in groups.items() for i in rows}
    if not targets:
        return 0.0
    caps = erasure_cell(model, runner, examples, groups, text_rep, layer, weight)
    kinds = runner.world.config.kinds
    return float(np.mean([targets[i] not in set(mentions(caps[i], kinds)) for i in sorted(targets)]))


def oracle_erasure(model: Any, runner: OrganismRunner, examples: Sequence[Example], baseline: Sequence[str]) -> dict:
    """CHAIR_i / recall with the true absent partner erased, per grid cell; ``best`` is the lowest CHAIR_i whose
    recall stays within :data:`MAX_RECALL_DROP` of the unedited captions'."""
    base = _chair(runner, baseline, examples)
    cells = []
    for rep in text_reps(model):
        for layer in range(model.n_layers):
            for weight in WEIGHTS:
                m = oracle_cell(model, runner, examples, rep, layer, weight)
                cells.append({"text_rep": rep, "hook": f"resid_post.{layer}", "weight": weight, **m,
                              "chair_i_change": _change(base["chair_i"], m["chair_i"])})
    allowed = [c for c in cells if base["recall"] - c["recall"] <= MAX_RECALL_DROP + 1e-12]
    best = min(allowed, key=lambda c: c["chair_i"]) if allowed else None
    return {"baseline": base, "best": best, "cells": cells,
            "rule": f"lowest CHAIR_i with recall drop <= {MAX_RECALL_DROP}"}


def present_removal(model: Any, runner: OrganismRunner, examples: Sequence[Example], baseline: Sequence[str]) -> dict:
    """Per grid cell, the fraction of captions that stop naming a present object once its text direction is
    erased from the image tokens (:func:`present_groups` picks the object); ``best`` is the highest rate."""
    n = sum(len(rows) for rows in present_groups(runner, examples, baseline).values())
    cells = [{"text_rep": rep, "hook": f"resid_post.{layer}", "weight": weight,
              "removed_rate": removal_cell(model, runner, examples, baseline, rep, layer, weight)}
             for rep in text_reps(model) for layer in range(model.n_layers) for weight in WEIGHTS]
    best = max(cells, key=lambda c: c["removed_rate"]) if cells and n else None
    return {"n": n, "best": best, "cells": cells, "rule": "highest removal rate over the grid"}


def internal_confidence_auroc(model: Any, runner: OrganismRunner, examples: Sequence[Example]) -> dict:
    """AUROC of ProjectAway's ``c_o`` (official recipe) for present objects against absent partners."""
    kinds = list(runner.world.config.kinds)
    scores, labels = [], []
    for start in range(0, len(examples), runner.batch_size):
        chunk = examples[start:start + runner.batch_size]
        conf = internal_confidence(model, runner._to_device(runner.encode(chunk)), kinds)  # [B, K]
        for row, e in enumerate(chunk):
            for k in e.scene.kinds:
                scores.append(float(conf[row, kinds.index(k)]))
                labels.append(1)
            scores.append(float(conf[row, kinds.index(e.meta["absent_partner"])]))
            labels.append(0)
    s, y = np.array(scores), np.array(labels)
    return {"auroc_present_vs_absent_partner": auroc_score(s, y), "n_present": int(y.sum()), "n_absent": int((1 - y).sum()),
            "mean_present": float(s[y == 1].mean()), "mean_absent_partner": float(s[y == 0].mean()),
            "score": "c_o: logit lens over every layer and image token, top-50 renormalised (ProjectAway's)"}


def attention_by_answer(model: Any, runner: OrganismRunner, split: str = "adversarial") -> dict:
    """Attention share on the image tokens at the last prompt token of POPE's ``split``, by answer outcome.
    Needs eager attention (``haltrace.load(..., attn_implementation="eager")``); ``None`` values otherwise."""
    from haltrace.trace.attention import attention_to_image

    if model.adapter.attn_implementation != "eager":
        return {"note": "skipped: the model was not loaded with eager attention"}
    examples = tasks.pope_sets(runner.world)[split]
    answers = runner.answers(examples)
    per_layer = []
    for start in range(0, len(examples), runner.batch_size):
        chunk = examples[start:start + runner.batch_size]
        air = attention_to_image(model, runner._to_device(runner.encode(chunk)), "last")
        per_layer.append(air.per_layer[:, 0].float().cpu())  # [B, layers]
    ratios = torch.cat(per_layer).numpy()
    outcome = ["hallucinated_yes" if a == "yes" and e.target == "no" else
               "correct_yes" if a == "yes" else "correct_no" if e.target == "no" else "missed_yes"
               for a, e in zip(answers, examples, strict=True)]
    out: dict = {"split": split, "position": "last prompt token, mean over heads"}
    for group in ("correct_yes", "hallucinated_yes", "correct_no", "missed_yes"):
        rows = [i for i, o in enumerate(outcome) if o == group]
        out[group] = ({"n": len(rows), "mean": float(ratios[rows].mean()),
                       "by_layer": [round(float(v), 4) for v in ratios[rows].mean(0)]} if rows else {"n": 0})
    return out


def measure_mechanism(model: Any, world: Any = None) -> dict:
    """Every mechanism check on a haltrace Model of an organism (its world from ``world.json`` unless given)."""
    from haltrace.organism.paths import organism_world

    started = time.perf_counter()
    world = world or organism_world(model)
    if world is None:
        raise ValueError("measure_mechanism needs an organism (a folder with world.json) or its world")
    runner = OrganismRunner(model.hf, world)
    examples = tasks.caption_set(world)
    baseline = runner.captions(examples)
    report = {
        "oracle_erasure": oracle_erasure(model, runner, examples, baseline),
        "present_removal": present_removal(model, runner, examples, baseline),
        "internal_confidence": internal_confidence_auroc(model, runner, examples),
        "attention_to_image": attention_by_answer(model, runner),
    }
    report["seconds"] = time.perf_counter() - started
    return report


def _change(before: float, after: float) -> float | None:
    """Relative change ``after / before - 1`` (``None`` when ``before`` is 0)."""
    return after / before - 1 if before else None
