"""Measure the organism's planted phenomena on its held-out sets.

Answers are greedy next-token predictions (one forward pass per question; the organism answers in one
word). Captions are greedy generations. The logit lens here is the standard one: the final norm applied to
``resid_post.i`` (``hidden_states[i+1]``), then the unembedding; HF's last hidden state is already normed.

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

from haltrace.evals.chair import chair_metrics
from haltrace.evals.pope import pope_metrics
from haltrace.organism import tasks
from haltrace.organism.processing import EOS, build_vocab, n_image_tokens
from haltrace.organism.tasks import Example
from haltrace.organism.train import encode_examples, load_world
from haltrace.organism.world import REFUSAL_WORD, ShapesWorld


class OrganismRunner:
    """Batched greedy answers, hidden states and captions for organism examples."""

    def __init__(self, model, world: ShapesWorld, batch_size: int = 128):
        self.model = model.eval()
        self.world = world
        self.vocab = build_vocab(world)
        self.words = {i: w for w, i in self.vocab.items()}
        self.n_img = n_image_tokens(world)
        self.batch_size = batch_size
        self.generate_kwargs: dict = {}  # e.g. a decoding strategy (DoLa) applied to captions

    @torch.no_grad()
    def last_position(self, examples: Sequence[Example], hidden: bool = False):
        """Logits (and optionally every hidden state) at the last prompt token. Right padding keeps the
        positions of real tokens unchanged, so the result equals an unpadded forward."""
        logits, states = [], []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            batch = self._to_device(encode_examples(chunk, self.vocab, self.n_img, with_targets=False))
            out = self.model(**batch, output_hidden_states=hidden)
            last = batch["attention_mask"].sum(1) - 1
            rows = torch.arange(len(chunk), device=last.device)
            logits.append(out.logits[rows, last].float().cpu())
            if hidden:
                states.append(torch.stack([h[rows, last] for h in out.hidden_states], 1).float().cpu())
        return torch.cat(logits), (torch.cat(states) if hidden else None)

    def _to_device(self, batch: dict) -> dict:
        param = next(self.model.parameters())
        return {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
                for k, v in batch.items()}

    def answers(self, examples: Sequence[Example]) -> list[str]:
        logits, _ = self.last_position(examples)
        return [self.words[int(i)] for i in logits.argmax(-1)]

    def lens_logits(self, states: torch.Tensor) -> torch.Tensor:
        """[N, n_layers+1, d] hidden states -> [N, n_layers, vocab] logit-lens logits for resid_post.0..n-1."""
        lm = self.model.model.language_model
        param = next(lm.norm.parameters())
        post = states[:, 1:].to(param.device, param.dtype)
        normed = torch.cat([lm.norm(post[:, :-1]), post[:, -1:]], 1)  # HF already normed the last entry
        head = self.model.lm_head
        head_param = next(head.parameters())  # with device_map the head may sit on another device
        return head(normed.to(head_param.device, head_param.dtype)).float().cpu()

    @torch.no_grad()
    def captions(self, examples: Sequence[Example], max_new_tokens: int = 10) -> list[str]:
        out = []
        eos = self.vocab[EOS]
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            batch = self._to_device(encode_examples(chunk, self.vocab, self.n_img, with_targets=False))
            if not bool(batch["attention_mask"].all()):
                raise ValueError("caption prompts must share one length (no padding)")
            gen = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos, **self.generate_kwargs)
            for row in gen[:, batch["input_ids"].shape[1]:].tolist():
                words = []
                for tok in row:
                    if tok == eos:
                        break
                    words.append(self.words[tok])
                out.append(" ".join(words))
        return out


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else 0.0


def measure_phenomena(model_or_path, world: ShapesWorld | None = None, *, probe_layers: bool = True) -> dict:
    """Every phenomenon of the organism as one JSON-ready dict (rates in [0, 1])."""
    started = time.perf_counter()
    if isinstance(model_or_path, (str, Path)):
        from transformers import LlavaForConditionalGeneration

        world = world or load_world(model_or_path)
        model = LlavaForConditionalGeneration.from_pretrained(model_or_path)
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
    """POPE metrics per split, the (example, answer) records, and the no-anchor control."""
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
    """Counterfactual colour answers (prior / pixel / other) and, with ``lens``, the prior-leads curve."""
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
    leads = (lens_logits[rows, :, prior_ids] > lens_logits[rows, :, pixel_ids]).float().mean(0).tolist()
    lens_report = {
        "prior_leads_first_layer": leads[0],
        "prior_leads_last_layer": leads[-1],
        "prior_leads_by_layer": leads,
        "layer_convention": "resid_post.i (hidden_states[i+1]), final norm then lm_head, last prompt token",
    }
    return report, lens_report


def eval_colour_control(runner: OrganismRunner) -> dict:
    control = tasks.colour_control_set(runner.world)
    answers = runner.answers(control)
    return {"accuracy": _rate([a == e.target for a, e in zip(answers, control, strict=True)]), "n": len(control)}


def eval_chair(runner: OrganismRunner) -> dict:
    """CHAIR on the anchor-without-partner caption set, with the share of hallucinations that are partners."""
    world = runner.world
    caps = tasks.caption_set(world)
    generated = runner.captions(caps)
    chair = chair_metrics(generated, [e.scene.kinds for e in caps], vocabulary=world.config.kinds)
    partner_mentions = sum(e.meta["absent_partner"] in g.split() for e, g in zip(caps, generated, strict=True))
    chair["partner_fraction_of_hallucinations"] = (partner_mentions / chair["hallucinated"]
                                                   if chair["hallucinated"] else 0.0)
    chair["absent_partner_named_rate"] = partner_mentions / len(caps)
    chair["objects_per_caption"] = chair["mentions"] / len(caps)
    chair["examples"] = [{"truth": e.target, "generated": g}
                         for e, g in list(zip(caps, generated, strict=True))[:5]]
    return chair


def eval_entity(runner: OrganismRunner) -> dict:
    """Refusal ("unknown") rates on known, taught-unknown and never-seen names, and accuracy on known facts."""
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
    so that the question alone carries no signal. Words without both labels are dropped."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, str]] = set()
    by_word: dict[str, dict[int, list[Example]]] = {}
    for ex, answer in pope_records:
        key = (ex.meta["image_id"], ex.prompt)
        if answer != "yes" or key in seen:  # the same question appears in several POPE splits
            continue
        seen.add(key)
        label = int(ex.target == "no")
        by_word.setdefault(ex.meta["kind"], {0: [], 1: []})[label].append(ex)
    out = []
    for word in sorted(by_word):
        groups = by_word[word]
        n = min(len(groups[0]), len(groups[1]))
        for label in (0, 1):
            picks = rng.permutation(len(groups[label]))[:n]
            for i in sorted(picks):
                ex = groups[label][i]
                out.append(Example(ex.prompt, ex.target, ex.scene, ex.image, {**ex.meta, "label": label}))
    return out


def hallucination_probe_confound(runner: OrganismRunner, pope_records, probe_layers: bool = True) -> dict:
    """AUROC of a question-only baseline on the balanced hallucination-probe set (and of per-layer probes)."""
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
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    words = sorted({e.meta["kind"] for e in probe_set})
    onehot = np.array([[e.meta["kind"] == w for w in words] for e in probe_set], dtype=np.float32)
    scores = cross_val_predict(LogisticRegression(max_iter=1000), onehot, labels, cv=folds,
                               method="predict_proba")[:, 1]
    result["question_only_auroc"] = float(roc_auc_score(labels, scores))
    if probe_layers:
        _, states = runner.last_position(probe_set, hidden=True)
        aurocs = []
        for layer in range(1, states.shape[1]):
            x = states[:, layer].numpy()
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
            s = cross_val_predict(LogisticRegression(max_iter=2000, C=0.1), x, labels, cv=folds,
                                  method="predict_proba")[:, 1]
            aurocs.append(float(roc_auc_score(labels, s)))
        result["probe_auroc_by_layer"] = aurocs
        result["probe_layer_convention"] = "resid_post.i at the last prompt token, logistic regression, 5-fold CV"
    return result
