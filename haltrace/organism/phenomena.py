"""Measure the organism's planted phenomena on its held-out sets.

The ShapesWorld organism (:mod:`haltrace.organism.world`) is trained so that three priors make it hallucinate:
co-occurrence (an absent fork/knife partner gets a "yes"), canonical colours (a blue strawberry is called red)
and entity familiarity (unseen names should get ``unknown``). This module checks that training really planted
them, on the held-out sets of :mod:`haltrace.organism.tasks`:

* :func:`measure_phenomena` runs everything and returns the dict that ``haltrace organism train`` writes to
  ``phenomena.json`` (``haltrace organism eval`` prints it) and :mod:`haltrace.organism.card` turns into the
  model card's table;
* the ``eval_*`` functions are the single evaluations; :mod:`haltrace.organism.suite` reuses them (under a
  steering intervention) for ``haltrace eval`` / ``haltrace steer``;
* :class:`OrganismRunner` feeds examples to the HF model; :mod:`haltrace.organism.probe_tasks` and
  :mod:`haltrace.demo` use it directly, and :func:`hallucination_probe_set` builds the balanced probe task.

Inputs are encoded straight from the organism's word-level vocabulary
(:func:`haltrace.organism.train.encode_examples`), not through the processor. Answers are greedy next-token
predictions (one forward pass per question; the organism answers in one word). Captions are greedy
generations. The logit lens here is the standard one: the final norm applied to ``resid_post.i`` (``hidden_states[i+1]``), then the unembedding; HF's
last hidden state is already normed. Every rate in a report is a fraction in [0, 1] over the items of its set.

>>> from haltrace.organism.phenomena import measure_phenomena
>>> report = measure_phenomena("artifacts/organisms/shapes-llava")  # doctest: +SKIP
>>> report["pope"]["adversarial"]["yes_ratio"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from haltrace.data.chair import chair_metrics
from haltrace.evals.pope import pope_metrics
from haltrace.organism import tasks
from haltrace.organism.processing import EOS, build_vocab, n_image_tokens, organism_arch
from haltrace.organism.tasks import Example
from haltrace.organism.train import encode_examples, load_world
from haltrace.organism.world import REFUSAL_WORD, ShapesWorld


class OrganismRunner:
    """Batched greedy answers, hidden states and captions for organism examples.

    ``model`` is the raw HF model (a haltrace Model's ``.hf``; LLaVA or Qwen2-VL), ``world`` the
    ShapesWorld it was trained on (it fixes the vocabulary and the number of image tokens). ``batch_size`` is
    the number of examples per forward pass or ``generate()`` call. The model is put in eval mode but left on
    its device and dtype; inputs follow the first parameter's. ``words`` maps token id -> word.
    """

    def __init__(self, model, world: ShapesWorld, batch_size: int = 128):
        self.model = model.eval()
        self.world = world
        self.arch = organism_arch(model.config)
        self.vocab = build_vocab(world, self.arch)
        self.words = {i: w for w, i in self.vocab.items()}
        self.n_img = n_image_tokens(world, self.arch)
        self.batch_size = batch_size
        self.generate_kwargs: dict = {}  # e.g. a decoding strategy (DoLa) applied to captions

    @torch.no_grad()
    def last_position(self, examples: Sequence[Example], hidden: bool = False):
        """Logits (and optionally every hidden state) at the last prompt token. Right padding keeps the
        positions of real tokens unchanged, so the result equals an unpadded forward.

        Returns ``(logits, states)`` on the CPU in float32: logits ``[N, vocab]``; states ``[N, n_layers+1, d]``
        (entry 0 the embeddings, entry ``i+1`` = ``resid_post.i``, HF's ``hidden_states`` order) with
        ``hidden=True``, else ``None``. The prompt is BOS, the image tokens (if the example has an image), then
        the prompt words; on the held-out sets the last one is the ``:`` that ends every prompt.
        """
        logits, states = [], []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            batch = self._to_device(self.encode(chunk))
            out = self.model(**batch, output_hidden_states=hidden)
            last = batch["attention_mask"].sum(1) - 1  # right padding: real tokens are a prefix of each row
            rows = torch.arange(len(chunk), device=last.device)
            logits.append(out.logits[rows, last].float().cpu())
            if hidden:
                states.append(torch.stack([h[rows, last] for h in out.hidden_states], 1).float().cpu())
        return torch.cat(logits), (torch.cat(states) if hidden else None)

    def encode(self, examples: Sequence[Example]) -> dict:
        """The model's inputs for ``examples`` (prompts only), on the CPU: see
        :func:`haltrace.organism.train.encode_examples`."""
        return encode_examples(examples, self.vocab, self.n_img, with_targets=False, arch=self.arch)

    def _to_device(self, batch: dict) -> dict:
        """Move the encoded batch to the model's device; float tensors (pixel values) take its dtype too, while
        ids and masks keep their integer dtype."""
        param = next(self.model.parameters())
        return {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
                for k, v in batch.items()}

    def answers(self, examples: Sequence[Example]) -> list[str]:
        """The greedy one-word answer to each example: the argmax word of the next-token logits. A
        ``generate_kwargs`` decoding strategy does not reach these (no ``generate()`` call); activation
        interventions installed on the model do."""
        logits, _ = self.last_position(examples)
        return [self.words[int(i)] for i in logits.argmax(-1)]

    def lens_logits(self, states: torch.Tensor) -> torch.Tensor:
        """[N, n_layers+1, d] hidden states -> [N, n_layers, vocab] logit-lens logits for resid_post.0..n-1.

        ``states`` is the second output of :meth:`last_position` with ``hidden=True``; the result is float32 on
        the CPU. Its last layer reproduces the model's own logits at that position (up to dtype rounding).
        """
        lm = self.model.model.language_model
        param = next(lm.norm.parameters())
        post = states[:, 1:].to(param.device, param.dtype)  # drop the embeddings (hidden_states[0])
        normed = torch.cat([lm.norm(post[:, :-1]), post[:, -1:]], 1)  # HF already normed the last entry
        head = self.model.lm_head
        head_param = next(head.parameters())  # with device_map the head may sit on another device
        return head(normed.to(head_param.device, head_param.dtype)).float().cpu()

    @torch.no_grad()
    def captions(self, examples: Sequence[Example], max_new_tokens: int = 10) -> list[str]:
        """Greedy captions (``generate()`` with ``generate_kwargs``), one space-joined string of words per
        example, cut at the first EOS. ``max_new_tokens`` = 10 fits the longest training caption ("kind colour"
        for at most four objects: 8 words) plus EOS. All prompts in a batch must have the same length (true of the caption set:
        every prompt is ``caption :`` after one image)."""
        out = []
        eos = self.vocab[EOS]
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            batch = self._to_device(self.encode(chunk))
            # encode_examples pads on the right, and generate() would append new tokens after the padding
            if not bool(batch["attention_mask"].all()):
                raise ValueError("caption prompts must share one length (no padding)")
            gen = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos, **self.generate_kwargs)
            for row in gen[:, batch["input_ids"].shape[1]:].tolist():  # generate() returns prompt + new tokens
                words = []
                for tok in row:
                    if tok == eos:
                        break
                    words.append(self.words[tok])
                out.append(" ".join(words))
        return out


def _rate(flags: Sequence[bool]) -> float:
    """Fraction of true flags; 0.0 for an empty set (a report stays JSON-ready instead of holding NaN).

    >>> _rate([True, False, False, True]), _rate([])
    (0.5, 0.0)
    """
    return float(np.mean(flags)) if len(flags) else 0.0


def measure_phenomena(model_or_path, world: ShapesWorld | None = None, *, probe_layers: bool = True) -> dict:
    """Every phenomenon of the organism as one JSON-ready dict (rates in [0, 1]).

    ``model_or_path`` is an organism folder (the model, with ``from_pretrained`` defaults, and its
    ``world.json`` are loaded from it) or an in-memory HF Llava model, which then needs ``world``.
    ``probe_layers=False`` skips the per-layer probes of ``probe_confound`` (one extra forward pass and one
    cross-validated logistic regression per layer).

    Keys: ``pope`` (per split, :func:`eval_pope`), ``pope_control``, ``counterfactual_color`` and ``lens_color``
    (:func:`eval_counterfactual`), ``color_control``, ``chair``, ``entity``, ``probe_confound``
    (:func:`hallucination_probe_confound`), and ``seconds`` (wall time of the whole measurement).
    """
    started = time.perf_counter()
    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModelForImageTextToText

        world = world or load_world(model_or_path)
        model = AutoModelForImageTextToText.from_pretrained(model_or_path)
    else:
        model = model_or_path
        if world is None:
            raise ValueError("pass the ShapesWorld when giving an in-memory model")
    runner = OrganismRunner(model, world)
    report: dict = {}
    report["pope"], pope_records, report["pope_control"] = eval_pope(runner)
    report["counterfactual_color"], report["lens_color"] = eval_counterfactual(runner)
    report["color_control"] = eval_colour_control(runner)
    report["chair"] = eval_chair(runner)
    report["entity"] = eval_entity(runner)
    report["probe_confound"] = hallucination_probe_confound(runner, pope_records, probe_layers=probe_layers)
    report["seconds"] = time.perf_counter() - started
    return report


def eval_pope(runner: OrganismRunner) -> tuple[dict, list[tuple[Example, str]], dict]:
    """POPE metrics per split, the (example, answer) records, and the no-anchor control.

    Returns ``(report, records, control)``: ``report[split]`` (random / popular / adversarial) holds
    :func:`haltrace.evals.pope.pope_metrics` (accuracy, F1, yes_ratio, false_yes_rate, counts); ``records``
    pairs every question of every split with the model's answer (input of :func:`hallucination_probe_set`);
    ``control`` is the "yes" rate on a pair member when neither it nor its partner is in the image. A high
    adversarial false-yes rate with a low control rate means the "yes" comes from co-occurrence with the
    visible anchor, not from a prior on the word itself.
    """
    world = runner.world
    report, records = {}, []
    for split, examples in tasks.pope_sets(world).items():
        answers = runner.answers(examples)
        report[split] = pope_metrics(answers, [e.target for e in examples])
        records += list(zip(examples, answers, strict=True))
    control = tasks.partner_control_set(world)
    control_answers = runner.answers(control)
    control_report = {"partner_absent_anchor_absent_yes_rate": _rate([a == "yes" for a in control_answers]),
                      "n": len(control)}
    return report, records, control_report


def eval_counterfactual(runner: OrganismRunner, *, lens: bool = True, keep_answers: bool = False
                        ) -> tuple[dict, dict | None]:
    """Counterfactual colour answers (prior / pixel / other) and, with ``lens``, the prior-leads curve.

    The set shows a canonical-colour kind painted another colour and asks "what colour is the X ?". Each
    answer is labelled *prior* (the canonical colour: a hallucination from the prior), *pixel* (what the image
    shows: correct) or *other*. The report holds the three rates, ``n`` and ``by_kind`` (prior/pixel rates per
    canonical kind); ``keep_answers`` adds the per-item ``answers`` and ``labels`` (for flip rates under an
    intervention). The lens report's ``prior_leads_by_layer[i]`` is the fraction of items whose prior-colour
    logit beats the pixel-colour logit under the logit lens at ``resid_post.i`` (last prompt token). Returns
    ``(report, lens_report)``; ``lens_report`` is ``None`` with ``lens=False``.
    """
    world = runner.world
    cf = tasks.counterfactual_colour_set(world)
    logits, states = runner.last_position(cf, hidden=lens)
    answers = [runner.words[int(i)] for i in logits.argmax(-1)]
    prior = [e.meta["prior"] for e in cf]
    pixel = [e.meta["pixel"] for e in cf]
    report = {
        "prior_rate": _rate([a == p for a, p in zip(answers, prior, strict=True)]),
        "pixel_rate": _rate([a == p for a, p in zip(answers, pixel, strict=True)]),
        "other_rate": _rate([a not in (p, q) for a, p, q in zip(answers, prior, pixel, strict=True)]),
        "n": len(cf),
        "by_kind": {
            kind: {"prior_rate": _rate([a == e.meta["prior"] for a, e in zip(answers, cf, strict=True)
                                        if e.meta["kind"] == kind]),
                   "pixel_rate": _rate([a == e.meta["pixel"] for a, e in zip(answers, cf, strict=True)
                                        if e.meta["kind"] == kind])}
            for kind in sorted(world.config.canonical)
        },
    }
    if keep_answers:
        report["answers"] = answers
        report["labels"] = ["prior" if a == p else "pixel" if a == q else "other"
                            for a, p, q in zip(answers, prior, pixel, strict=True)]
    if not lens:
        return report, None
    lens_logits = runner.lens_logits(states)
    prior_ids = torch.tensor([runner.vocab[c] for c in prior])
    pixel_ids = torch.tensor([runner.vocab[c] for c in pixel])
    rows = torch.arange(len(cf))
    # [N, n_layers] comparisons of the two colour words per item and layer, averaged over items
    leads = (lens_logits[rows, :, prior_ids] > lens_logits[rows, :, pixel_ids]).float().mean(0).tolist()
    lens_report = {
        "prior_leads_first_layer": leads[0],
        "prior_leads_last_layer": leads[-1],
        "prior_leads_by_layer": leads,
        "layer_convention": "resid_post.i (hidden_states[i+1]), final norm then lm_head, last prompt token",
    }
    return report, lens_report


def eval_colour_control(runner: OrganismRunner) -> dict:
    """Accuracy of colour answers on kinds that have no canonical colour: ``{"accuracy", "n"}``.

    The counterfactual set's prior rate only means "the prior won" if the model can read colours at all;
    this control measures exactly that, with no prior to compete.
    """
    control = tasks.colour_control_set(runner.world)
    answers = runner.answers(control)
    return {"accuracy": _rate([a == e.target for a, e in zip(answers, control, strict=True)]), "n": len(control)}


def eval_chair(runner: OrganismRunner) -> dict:
    """CHAIR on the anchor-without-partner caption set, with the share of hallucinations that are partners.

    Returns :func:`haltrace.data.chair.chair_metrics` over the object kinds (``chair_s`` = fraction of
    captions with a hallucinated object, ``chair_i`` = fraction of object mentions that are hallucinated,
    ``recall``, counts) plus: ``partner_fraction_of_hallucinations`` (captions naming the absent partner per
    hallucinated mention), ``absent_partner_named_rate`` (fraction of captions naming it),
    ``objects_per_caption``, and the first five ``examples`` (training caption vs generated).
    """
    world = runner.world
    caps = tasks.caption_set(world)
    generated = runner.captions(caps)
    chair = chair_metrics(generated, [e.scene.kinds for e in caps], vocabulary=world.config.kinds)
    # the partner is never in these images, so naming it is always a hallucination; counted once per caption
    partner_mentions = sum(e.meta["absent_partner"] in g.split() for e, g in zip(caps, generated, strict=True))
    chair["partner_fraction_of_hallucinations"] = (partner_mentions / chair["hallucinated"]
                                                   if chair["hallucinated"] else 0.0)
    chair["absent_partner_named_rate"] = partner_mentions / len(caps)
    chair["objects_per_caption"] = chair["mentions"] / len(caps)
    chair["examples"] = [{"truth": e.target, "generated": g}
                         for e, g in list(zip(caps, generated, strict=True))[:5]]
    return chair


def eval_entity(runner: OrganismRunner) -> dict:
    """Refusal ("unknown") rates on known, taught-unknown and never-seen names, and accuracy on known facts.

    The headline is ``refusal_unknown``, on held-out names: they are new combinations of trained syllables,
    so refusing them needs the model to recognise the entity as unfamiliar (not merely an untrained token).
    ``refusal_known`` is the over-refusal rate; ``n`` counts the known and held-out questions (not the
    taught-unknown ones).
    """
    ent = tasks.entity_sets(runner.world)
    answers = {group: runner.answers(examples) for group, examples in ent.items()}
    return {
        "refusal_unknown": _rate([a == REFUSAL_WORD for a in answers["unknown_heldout"]]),
        "refusal_unknown_trained": _rate([a == REFUSAL_WORD for a in answers["unknown_train"]]),
        "refusal_known": _rate([a == REFUSAL_WORD for a in answers["known"]]),
        "accuracy_known": _rate([a == e.target for a, e in zip(answers["known"], ent["known"], strict=True)]),
        "n": len(ent["known"]) + len(ent["unknown_heldout"]),
        "n_known": len(ent["known"]), "n_unknown_heldout": len(ent["unknown_heldout"]),
        "note": "refusal_unknown is on names never seen in training",
    }


def hallucination_probe_set(pope_records: Sequence[tuple[Example, str]], seed: int = 0) -> list[Example]:
    """The model's "yes" answers, label 1 = object absent (hallucinated), balanced within each question word
    so that the question alone carries no signal. Words without both labels are dropped.

    ``pope_records`` are :func:`eval_pope`'s (example, answer) pairs. Within each word the larger label group
    is subsampled (``seed``) to the smaller one's size; the returned examples carry ``meta["label"]``.

    >>> ask = lambda i, kind, truth: Example(f"is there a {kind} ?", truth, meta={"image_id": i, "kind": kind})
    >>> records = [(ask(0, "fork", "yes"), "yes"), (ask(1, "fork", "no"), "yes"),
    ...            (ask(2, "fork", "yes"), "yes"), (ask(3, "cup", "yes"), "yes"), (ask(4, "fork", "no"), "no")]
    >>> [(e.meta["image_id"], e.meta["label"]) for e in hallucination_probe_set(records)]  # one fork per label
    [(0, 0), (1, 1)]
    """
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, str]] = set()
    by_word: dict[str, dict[int, list[Example]]] = {}
    for ex, answer in pope_records:
        key = (ex.meta["image_id"], ex.prompt)
        if answer != "yes" or key in seen:  # the same question appears in several POPE splits
            continue
        seen.add(key)
        label = int(ex.target == "no")  # the model said "yes" but the object is absent
        by_word.setdefault(ex.meta["kind"], {0: [], 1: []})[label].append(ex)
    out = []
    for word in sorted(by_word):
        groups = by_word[word]
        n = min(len(groups[0]), len(groups[1]))
        for label in (0, 1):
            picks = rng.permutation(len(groups[label]))[:n]
            for i in sorted(picks):  # the draw decides which examples, not their order: records' order kept
                ex = groups[label][i]
                out.append(Example(ex.prompt, ex.target, ex.scene, ex.image, {**ex.meta, "label": label}))
    return out


def hallucination_probe_confound(runner: OrganismRunner, pope_records, probe_layers: bool = True) -> dict:
    """AUROC of a question-only baseline on the balanced hallucination-probe set (and of per-layer probes).

    A probe that separates hallucinated from correct "yes" answers could just be reading which object was
    asked about (a partner question is more often a hallucination). The baseline is a logistic regression
    on the one-hot question word, 5-fold cross-validated: on a set balanced per word it should sit near 0.5,
    so per-layer probe AUROCs above it come from the activations. Returns ``n``, ``n_hallucinated``,
    ``words``, ``question_only_auroc`` (``None`` with a ``note`` when the set is too small or one-class) and,
    with ``probe_layers``, ``probe_auroc_by_layer[i]`` for a probe on ``resid_post.i`` at the last prompt
    token.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    probe_set = hallucination_probe_set(pope_records)
    labels = np.array([e.meta["label"] for e in probe_set])
    result: dict = {"n": len(probe_set), "n_hallucinated": int(labels.sum()),
                    "words": sorted({e.meta["kind"] for e in probe_set})}
    if len(probe_set) < 10 or labels.min() == labels.max():
        result.update(question_only_auroc=None, note="too few hallucinated 'yes' answers for a probe set")
        return result
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)  # the same folds for baseline and probes
    words = sorted({e.meta["kind"] for e in probe_set})
    onehot = np.array([[e.meta["kind"] == w for w in words] for e in probe_set], dtype=np.float32)
    scores = cross_val_predict(LogisticRegression(max_iter=1000), onehot, labels, cv=folds,
                               method="predict_proba")[:, 1]
    result["question_only_auroc"] = float(roc_auc_score(labels, scores))
    if probe_layers:
        _, states = runner.last_position(probe_set, hidden=True)
        aurocs = []
        for layer in range(1, states.shape[1]):  # skip entry 0 (embeddings): entry i+1 is resid_post.i
            x = states[:, layer].numpy()
            # standardise so the fixed C penalises every layer alike whatever its scale (uses no labels: no leak)
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
            s = cross_val_predict(LogisticRegression(max_iter=2000, C=0.1), x, labels, cv=folds,
                                  method="predict_proba")[:, 1]
            aurocs.append(float(roc_auc_score(labels, s)))
        result["probe_auroc_by_layer"] = aurocs
        result["probe_layer_convention"] = "resid_post.i at the last prompt token, logistic regression, 5-fold CV"
    return result
