"""VISTA — Visual Information Steering with Token-logit Augmentation (Li et al., arXiv 2502.03628, ICML 2025).

Two parts, both computed per input (no demonstration set):

* **VSV** (visual steering vector): for each prompt, the last-prompt-token state at every layer with the image
  minus the same text without the image tokens, ``v_l = F_l(X_p) - F_l(X_n)``. While generating, every
  layer's **MLP output** ``x`` (every token, prefill and decoding; the official code's site, not the paper's
  "residual stream") becomes ``normalize(normalize(x) + lam * lam_sim * normalize(v_l)) * ||x||`` with
  ``lam_sim = 1 + max(0, cos(x, -v_l))`` per token (:func:`haltrace.steering.vti.rotate_towards`).
  Deviation: the official code adds the PC1 of a single-sample "PCA" (an implementation-defined unit vector,
  methods-vlm.md §5 pitfall 2); we use ``diff`` itself.
* **SLA** (self-logits augmentation): ``logits = (1 - gamma) * logits + gamma * mean_l lm_head(h_l)`` over a
  window of late layers, without the final norm as in the code (``sla_norm=True`` applies it).

Layer convention: ``v_l`` is read at ``resid_post.l`` (HF ``hidden_states[l+1]``; the code's forward hook on
``layers[l]``) and applied at ``mlp_out.l``. The code's SLA window ``--logits-layers 25,30`` indexes
``hidden_states[1:]``, i.e. ``resid_post.25..30`` of 32 layers (ending one block before the last); the
default here keeps that shape: ``resid_post.{n-1-w}..{n-2}`` with ``w = max(2, round(6 n / 32))``.

Defaults: ``lam = 0.01`` for yes/no questions (the code's POPE setting) and ``0.17`` for captions
(``task="caption"``), ``gamma = 0.3``; ``preset="paper"`` is the same configuration (the deviations it records
are the VSV's PC1 and, on a model that is not 32 layers deep, the scaled SLA window). ``haltrace steer`` evaluates
CHAIR under the caption fit (:attr:`VISTA.eval_fit_options`).

Fidelity (official code step -> haltrace -> same or different):

=============================================  ==========================  =====================================
VSV: last-token states with / without image    ``steering_vectors``        same (read at ``resid_post.l``)
VSV direction: PC1 of one-sample "PCA"         ``steering_vectors``        different: the difference itself
apply at every layer's MLP output, all tokens  ``VisualSteering``          same (engine edit at ``mlp_out.l``)
adaptive lambda_sim = 1 + max(0, cos(x, -v))   ``rotate_towards``          same
lambda 0.01 (POPE) / 0.17 (captions)           ``LAMBDA_DEFAULTS``         same; per evaluation in ``steer``
SLA: mix late-layer early-exit logits, 0.3     ``LogitsMix``               same (no final norm, as the code)
SLA window 25..30 of 32                        ``default_sla_layers``      scaled by depth on other models
=============================================  ==========================  =====================================

>>> from haltrace.steering.registry import get_method
>>> fitted = get_method("vista").fit(model, task="pope")          # doctest: +SKIP
>>> with fitted.apply(model):                                       # doctest: +SKIP
...     model.hf(**inputs)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from haltrace.errors import InputError
from haltrace.steering.fitdata import layer_record, require_vlm
from haltrace.steering.interventions import Intervention, register_state_type
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.steering.vti import rotate_towards

PAPER = ("Li et al., 'The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via "
         "Visual Information Steering' (VISTA), arXiv 2502.03628 (ICML 2025); code LzVv123456/VISTA@dc62252")
LAMBDA_DEFAULTS = {"pope": 0.01, "caption": 0.17}


def default_sla_layers(n_layers: int) -> list[int]:
    """The code's window shape (6 of 32 layers ending one block before the last), at least 2 layers."""
    w = max(2, round(6 * n_layers / 32))
    return list(range(max(0, n_layers - 1 - w), max(1, n_layers - 1)))


def _drop_image_tokens(model: Any, inputs: dict) -> dict:
    """The same prompts without their image tokens (the negative context ``[X_s, X_q]``), text only."""
    ids = inputs["input_ids"]
    keep = ~model.image_token_mask(ids)
    counts = keep.sum(1)
    if len(set(counts.tolist())) != 1:
        raise ValueError("VISTA: rows hold different numbers of image tokens; run one row at a time")
    out = {"input_ids": ids[keep].view(ids.shape[0], -1)}
    if "attention_mask" in inputs:
        out["attention_mask"] = inputs["attention_mask"][keep].view(ids.shape[0], -1)
    return out


@torch.no_grad()
def steering_vectors(model: Any, inputs: dict) -> torch.Tensor:
    """``[B, n_layers, d]``: last-prompt-token ``resid_post`` with the image minus without it."""
    hooks = [f"resid_post.{i}" for i in range(model.n_layers)]
    pos = model.capture(inputs, hooks, positions="last")
    neg = model.capture(_drop_image_tokens(model, inputs), hooks, positions="last")
    return torch.stack([pos[h][:, -1] - neg[h][:, -1] for h in hooks], 1)


@register_state_type
@dataclass
class VisualSteering(Intervention):
    """VSV at ``mlp_out.L``: per prompt (its prefill, with an image), the rows' steering vectors ``v_l`` from
    :func:`steering_vectors` (computed once per prompt for every layer, shared through ``ctx.memo``); every
    token of every forward is rotated towards its row's ``v_l`` (:func:`rotate_towards`). A text-only prompt
    gets no edit (never the last batch's vectors)."""

    layer: int = 0
    lam: float = 0.01
    adaptive: bool = True
    prepares = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.__dict__["_vsv"] = None

    def prepare(self, model: Any, ctx: Any) -> None:
        if ctx.ids is None or not bool(model.image_token_mask(ctx.ids).any()):
            self.__dict__["_vsv"] = None
            return
        vsv = ctx.memo("vista-vsv", lambda: steering_vectors(model, ctx.prompt_inputs()))
        self.__dict__["_vsv"] = vsv[:, self.layer]

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        v = self.__dict__.get("_vsv")
        if v is None:
            return x
        if v.shape[0] != x.shape[0]:
            raise ValueError(f"VISTA: {v.shape[0]} steering vectors for a batch of {x.shape[0]}")
        return rotate_towards(x, v.to(x.device)[:, None, :], self.lam, adaptive=self.adaptive)


@register_state_type
@dataclass
class LogitsMix(Intervention):
    """SLA at ``logits``: ``(1 - gamma) * logits + gamma * mean_l lm_head(h_l)`` over ``resid_post.l`` of
    ``layers`` (final norm on ``h_l`` only with ``norm=True``), at every position the model returns."""

    layers: list[int] = field(default_factory=list)
    gamma: float = 0.3
    norm: bool = False

    def reads(self, model: Any) -> tuple[str, ...]:
        return tuple(f"resid_post.{i}" for i in self.layers)

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        head = ctx.model.adapter.unembed
        n = x.shape[1]  # the model may return only the last positions' logits (logits_to_keep)
        aug = []
        for i in self.layers:
            h = ctx.reads[f"resid_post.{i}"][:, -n:]
            h = ctx.model.adapter.final_norm(h) if self.norm else h
            aug.append(torch.nn.functional.linear(h, head.weight, getattr(head, "bias", None)))
        return (1 - self.gamma) * x + self.gamma * torch.stack(aug).mean(0).to(x.dtype)


def vista_interventions(n_layers: int, lam: float, gamma: float, sla_layers: Sequence[int], *,
                        adaptive: bool = True, sla_norm: bool = False) -> list[Intervention]:
    """VSV on every layer's MLP output (when ``lam``) and SLA on the logits (when ``gamma``)."""
    items: list[Intervention] = []
    if lam:
        items += [VisualSteering(f"mlp_out.{i}", layer=i, lam=lam, adaptive=adaptive) for i in range(n_layers)]
    if gamma:
        items.append(LogitsMix("logits", layers=list(sla_layers), gamma=gamma, norm=sla_norm))
    return items


@register_method
class VISTA(Method):
    """Per-input visual steering vector on MLP outputs plus self-logits augmentation.

    >>> fitted = VISTA().fit(model, task="caption", gamma=0.3)     # doctest: +SKIP
    """

    name = "vista"
    # the official code uses lambda 0.17 for captions and 0.01 for POPE: CHAIR is evaluated under the caption fit
    eval_fit_options = {"chair": {"task": "caption"}}
    summary = "VISTA: per-image (with - without image) steering of MLP outputs + late-layer logit mixing"

    def fit(self, model: Any, data: Any = None, *, task: str = "pope", lam: float | None = None,
            gamma: float = 0.3, sla_layers: Sequence[int] | None = None, adaptive: bool = True,
            sla_norm: bool = False, preset: str | None = None) -> FittedIntervention:
        """Nothing is learnt (the vector is computed per input at inference); ``data`` is unused.

        ``preset="paper"``: the official code's settings, which are also haltrace's defaults (lambda by task,
        gamma 0.3, the late-layer SLA window scaled to the model's depth, adaptive lambda, no final norm in SLA);
        options given explicitly still win and are recorded as deviations.
        """
        require_vlm(model, "VISTA (vista)", "it contrasts prompts with and without the image")
        if preset not in (None, "paper"):
            raise InputError(f"unknown VISTA preset {preset!r}; the only preset is 'paper' (the official settings)")
        if task not in LAMBDA_DEFAULTS:
            raise ValueError(f"task must be one of {sorted(LAMBDA_DEFAULTS)}, got {task!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        lam = LAMBDA_DEFAULTS[task] if lam is None else float(lam)
        sla = list(sla_layers) if sla_layers is not None else default_sla_layers(model.n_layers)
        bad = [i for i in sla if not 0 <= i < model.n_layers]
        if bad:
            raise ValueError(f"SLA layers {bad} out of range 0..{model.n_layers - 1}")
        items = vista_interventions(model.n_layers, lam, gamma, sla, adaptive=adaptive, sla_norm=sla_norm)
        provenance = {
            "method": self.name, "paper": PAPER, "task": task,
            "layers": {"vsv": [layer_record(f"mlp_out.{i}", f"vector from layers[{i}] output "
                                            f"(hidden_states[{i + 1}]), applied to layers[{i}].mlp")
                               for i in range(model.n_layers)],
                       "sla": [layer_record(f"resid_post.{i}", f"--logits-layers index {i}") for i in sla]},
            "lambda": lam, "gamma": gamma, "adaptive_lambda_sim": adaptive, "sla_final_norm": sla_norm,
            "positions": "all (every token of every forward)", "phase": "both",
            "data": {"description": "none: the steering vector is computed per input (with vs without its image)",
                     "n": 0, "fingerprint": None},
            "preset": preset,
            "deviations": _deviations(model, task, lam, gamma, sla, sla_layers is not None, adaptive, sla_norm),
        }
        return FittedIntervention(self.name, items, provenance)


def _deviations(model: Any, task: str, lam: float, gamma: float, sla: list[int], sla_given: bool, adaptive: bool,
                sla_norm: bool) -> list[str]:
    """Every place this fit differs from the official code's run (LzVv123456/VISTA) and why."""
    out = ["VSV is the with-minus-without difference itself; the official code takes the PC1 of a one-sample "
           "'PCA', an implementation-defined unit vector (methods-vlm.md section 5, pitfall 2)"]
    if lam != LAMBDA_DEFAULTS[task]:
        out.append(f"lambda {lam} (official for {task}: {LAMBDA_DEFAULTS[task]})")
    if gamma != 0.3:
        out.append(f"gamma {gamma} (official: 0.3)")
    if sla_given:
        out.append(f"SLA layers {sla} given explicitly (official: a 6-of-32 late window)")
    elif model.n_layers != 32:
        out.append(f"SLA window {sla} scaled from the official 6-of-32 layers (resid_post.25..30) to "
                   f"{model.n_layers} layers")
    if not adaptive:
        out.append("adaptive lambda_sim off (official: on)")
    if sla_norm:
        out.append("final norm applied to SLA's early-exit logits (official: none)")
    return out
