"""What methods share to fit on typed items (``haltrace.data``): prompts through the model's own template,
states at each prompt's last token, yes/no answer tokens, image-grouped splits, fit fingerprints.

Nothing here knows the organism: a method fits on a real checkpoint and on an organism through the same code.
Batches are grouped by token length so no row is padded: each row's states equal that prompt run alone.

>>> from haltrace.data import YesNoQuestion
>>> qs = [YesNoQuestion("is there a circle ?", "no", image=img), YesNoQuestion("is there a star ?", "yes", image=img)]
>>> logits, acts = question_states(model, qs, ["resid_post.1"])
>>> logits.shape[0], acts["resid_post.1"].shape
(2, torch.Size([2, 32]))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from haltrace.data.images import open_image
from haltrace.models.prompting import build_prompt

# Default seeds of the methods' fits (splits and sampling of their fit data). Two values, because the published
# organism numbers were fitted with both; merging them would change those fits.
#: PvP's default fit seed, shared by VTI and erasure (erasure draws with PVP_FIT_SEED + 3)
PVP_FIT_SEED = 12345
#: TruthPrInt's default fit seed, shared by VHR, ITI and CAA
TRUTHPRINT_FIT_SEED = 4242


def fingerprint(*arrays: Any, spec: Any = None) -> str:
    """sha256 (first 16 hex digits) of tensors/arrays plus a JSON-able spec: identifies a fit."""
    digest = hashlib.sha256(repr(spec).encode())
    for a in arrays:
        digest.update(np.ascontiguousarray(torch.as_tensor(a).detach().float().cpu().numpy()).tobytes())
    return digest.hexdigest()[:16]


def model_family(model: Any) -> str:
    """The model's family for messages: its config's ``model_type`` (``mistral``, ``qwen2_5_vl``), else the
    adapter's family."""
    return getattr(model.adapter.config, "model_type", None) or model.adapter.family


def require_vlm(model: Any, method: str, reason: str) -> None:
    """Refuse, before any forward, to fit ``method`` on a text-only model: a ``ValueError`` naming the method,
    the model's family and why the method needs images.

    >>> require_vlm(gpt2_model, "PvP (pvp)", "the contrast is on the same image")
    Traceback (most recent call last):
    ValueError: PvP (pvp) needs a vision-language model (the contrast is on the same image), but tiny-gpt2 is a text-only gpt2 model
    """
    if not model.is_vlm:
        raise ValueError(f"{method} needs a vision-language model ({reason}), but {model.name_or_path or 'this'} "
                         f"is a text-only {model_family(model)} model")


def item_prompts(model: Any, questions: Sequence[str], images: Sequence[Any] | None, *,
                 append: Sequence[str] | None = None, template: str | None = None) -> list[str]:
    """Prompts for plain ``questions`` (one image each when ``images`` holds one), with ``append`` (e.g. an
    answer, ITI/CAA's "question + answer") after the generation prompt."""
    if append is not None and len(append) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(append)} answers to append")
    out = []
    for i, q in enumerate(questions):
        has_image = images is not None and images[i] is not None
        p = build_prompt(model, q, image=has_image, template=template)
        out.append(p if append is None else f"{p} {append[i]}")
    return out


def _groups_by_length(model: Any, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def prompt_states(model: Any, prompts: Sequence[str], images: Sequence[Any] | None, hooks: Sequence[str], *,
                  batch_size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``[N, V]`` and ``{hook: [N, ...]}`` (float32, CPU) at each ready-made prompt's last token."""
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    logits: torch.Tensor | None = None
    acts: dict[str, torch.Tensor] = {}
    for idx in _groups_by_length(model, prompts, batch_size):
        chunk_images = None if images is None else [open_image(images[i]) for i in idx]
        if chunk_images is not None and all(im is None for im in chunk_images):
            chunk_images = None
        inputs = model.prepare([prompts[i] for i in idx], chunk_images)
        cap = model.capture(inputs, list(hooks), positions="last") if hooks else None
        out = cap.output if cap is not None else model.hf(**inputs)
        last = out.logits[:, -1].float().cpu()
        if logits is None:
            logits = torch.empty(len(prompts), last.shape[-1])
        logits[idx] = last
        for h in hooks:
            value = cap[h][:, -1].float().cpu()
            if h not in acts:
                acts[h] = torch.empty(len(prompts), *value.shape[1:])
            acts[h][idx] = value
    assert logits is not None
    return logits, acts


def question_states(model: Any, items: Sequence[Any], hooks: Sequence[str], *, append: Sequence[str] | None = None,
                    drop_image: bool = False, template: str | None = None, batch_size: int = 64
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`prompt_states` for items with ``question`` (or caption ``prompt``) and ``image`` fields;
    ``drop_image`` asks without the image (VHR's text-only branch)."""
    questions = [getattr(it, "question", None) or getattr(it, "prompt", None) for it in items]
    if any(q is None for q in questions):
        raise ValueError("every item needs a question (or a caption prompt)")
    images = None if drop_image else [getattr(it, "image", None) for it in items]
    if images is not None and all(im is None for im in images):
        images = None
    prompts = item_prompts(model, questions, images, append=append, template=template)
    return prompt_states(model, prompts, images, hooks, batch_size=batch_size)


def answer_token_ids(model: Any, word: str) -> list[int]:
    """First-token ids of ``word`` as a model may start an answer with it: "yes", " yes", "Yes", " Yes"
    (the tokenizer's unknown token excluded)."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    ids = set()
    for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        enc = tok(form, add_special_tokens=False)["input_ids"]
        if enc and enc[0] != unk:
            ids.add(int(enc[0]))
    if not ids:
        raise ValueError(f"the tokenizer of {model.name_or_path} has no token for {word!r}")
    return sorted(ids)


def says_yes(model: Any, logits: torch.Tensor) -> np.ndarray:
    """Whether the next token after each prompt is more a "yes" than a "no" (max logit over each word's forms)."""
    yes, no = answer_token_ids(model, "yes"), answer_token_ids(model, "no")
    if set(yes) & set(no):
        raise ValueError(f"the tokenizer of {model.name_or_path} cannot tell 'yes' from 'no' by first token")
    return (logits[:, yes].max(-1).values > logits[:, no].max(-1).values).numpy()


def answer_direction(model: Any, positive: str = "yes", negative: str = "no") -> torch.Tensor:
    """The answer-token direction in residual space: the mean unembedding row (the adapter's LM head) of
    ``positive``'s first-token forms minus that of ``negative``'s (:func:`answer_token_ids`), float32 on CPU.
    A steering vector's cosine with it says how much of the vector is a plain "say yes" ("say no") push."""
    weight = model.adapter.unembed.weight.detach()
    pos, neg = answer_token_ids(model, positive), answer_token_ids(model, negative)
    return (weight[pos].float().mean(0) - weight[neg].float().mean(0)).cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (0.0 when either is zero)."""
    a, b = a.detach().float().flatten().cpu(), b.detach().float().flatten().cpu()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def class_weights(classes: Sequence[Any]) -> np.ndarray:
    """Per-row weights giving every class the same total weight (each sums to 1 / n_classes): a weighted mean
    under them is the plain average of the per-class means.

    >>> class_weights(["no", "no", "yes"]).tolist()
    [0.25, 0.25, 0.5]
    """
    values = [str(c) for c in classes]
    counts = {c: values.count(c) for c in set(values)}
    return np.array([1.0 / (len(counts) * counts[c]) for c in values])


def image_split(image_ids: Sequence[Any], holdout: float = 0.3, seed: int = 0) -> np.ndarray:
    """Boolean mask, True = held-out; split by image so questions about one image stay together."""
    values = list(image_ids)
    # integer ids keep their numeric order (the split is a permutation of the sorted unique ids)
    ids = np.array(values) if all(isinstance(v, (int, np.integer)) for v in values) else np.array(
        [str(v) for v in values])
    unique = np.unique(ids)
    held = np.random.default_rng(seed + 1).permutation(unique)[: max(1, int(round(holdout * len(unique))))]
    return np.isin(ids, held)


def image_ids_of(items: Sequence[Any]) -> list[Any]:
    """Each item's ``image_id``, else its image path, else its position (so a split never pools unknowns)."""
    out = []
    for i, it in enumerate(items):
        key = getattr(it, "image_id", None)
        if key is None:
            image = getattr(it, "image", None)
            key = str(image) if isinstance(image, (str,)) or hasattr(image, "as_posix") else f"#{i}"
        out.append(key)
    return out


def items_fingerprint(items: Sequence[Any]) -> str:
    """sha256 (16 hex) over every field of the items, images by their RGB pixels: the same data gives the
    same fingerprint whether it came from memory or from a JSONL file and its image folder."""
    from dataclasses import fields

    digest = hashlib.sha256()
    for it in items:
        digest.update(it.kind.encode() + b"\0")
        for f in fields(it):
            value = getattr(it, f.name)
            if f.name == "image":
                if value is not None:
                    arr = np.asarray(open_image(value))
                    digest.update(str(arr.shape).encode() + arr.tobytes())
            else:
                digest.update(repr(value).encode() + b"\0")
    return digest.hexdigest()[:16]


@torch.no_grad()
def last_token_states(model: Any, prompts: Sequence[str], images: Sequence[Any] | None = None, *,
                      hooks: Sequence[str] | None = None, batch_size: int = 64) -> torch.Tensor:
    """``[N, len(hooks), d]`` float32 activations at each ready-made prompt's last token (default: every
    ``resid_post``); :func:`prompt_states` stacked.

    >>> states = last_token_states(model, ["<image> what color is the circle ? answer :"], [img])
    >>> states.shape   # [N, layers, d]
    torch.Size([1, 2, 32])
    """
    hooks = list(hooks) if hooks is not None else [f"resid_post.{i}" for i in range(model.n_layers)]
    _, acts = prompt_states(model, prompts, images, hooks, batch_size=batch_size)
    return torch.stack([acts[h] for h in hooks], 1)


@torch.no_grad()
def next_words(model: Any, prompts: Sequence[str], images: Sequence[Any] | None = None, *,
               interventions: Sequence[Any] = (), batch_size: int = 64) -> list[str]:
    """Greedy next word after each ready-made prompt, under ``interventions`` (one forward, no generate)."""
    from contextlib import nullcontext

    from haltrace.steering.engine import steer

    with steer(model, *interventions) if interventions else nullcontext():
        logits, _ = prompt_states(model, prompts, images, [], batch_size=batch_size)
    return [model.tokenizer.decode([tok]).strip() for tok in logits.argmax(-1).tolist()]


def layer_record(hook: str, paper_index: str) -> dict[str, str]:
    """Provenance entry for a layer: the haltrace hook, its HF hidden_states index, and the paper's index."""
    from haltrace.conventions import hidden_states_index, parse_hook

    point = parse_hook(hook)
    rec = {"haltrace": point.name, "paper": paper_index}
    if point.kind in ("resid_pre", "resid_post"):
        rec["hf_hidden_states_index"] = str(hidden_states_index(point))
    return rec
