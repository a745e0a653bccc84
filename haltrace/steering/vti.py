"""VTI — Visual and Textual Intervention (Liu, Ye, Xing, Zou, arXiv 2410.15778, ICLR 2025).

Two fixed directions, computed once from demonstrations and reused for every input:

* **visual**: for each demo image, ``num_trials`` copies with ``mask_ratio`` of the patches overwritten by the
  image's per-channel mean; the vision tower's hidden states averaged over the masked copies minus those of
  the clean image give ``D[layer, token, d_v]``; over demos, direction = mean + first principal component
  (unit, sign-fixed). One direction per vision layer *and token position*.
* **textual**: the LLM's state at the last token of a correct caption minus that of the same caption with a
  hallucinated object inserted (same image), every layer; over demos, mean + PC1.

Both are applied as in the official code: each layer's **MLP output** ``x`` (vision encoder layers, per
token; LLM layers, every position, prompt and generation) becomes
``normalize(normalize(x) + 0.1 * alpha * normalize(d_l)) * ||x||`` — a norm-preserving rotation
(:class:`RotateTowards`). This is not the engine's :class:`NormPreservingAdd` (which adds to the raw ``x``).

Layer convention: the textual direction for block ``L`` is read at ``resid_post.L`` (HF
``hidden_states[L+1]``, the paper's index ``L`` after it drops the embedding entry) and applied at
``mlp_out.L`` (the official code's pairing; methods-vlm.md §3 pitfall 3). Vision layer ``k`` uses the vision
tower's ``hidden_states[k+1]`` (output of encoder layer ``k``) for the direction and that layer's MLP output
for the edit. The visual PCA groups one demo's whole ``[token, d_v]`` difference per layer (the per-layer
reading of pitfall 1, not the official code's raw reshape).

``alpha_text``/``alpha_image`` are chosen on the fit data when not given: the pair with the largest drop of
the false-"yes" rate on the partner (adversarial) questions of a fit POPE set, subject to recall on present
objects falling by at most ``max_recall_drop``; ties go to smaller strengths.

>>> from haltrace.steering.registry import get_method
>>> fitted = get_method("vti").fit(model)                           # doctest: +SKIP
>>> with fitted.apply(model):                                         # doctest: +SKIP
...     model.hf.generate(**inputs)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from haltrace.steering.engine import Add
from haltrace.steering.pvp import (
    FIT_SEED,
    fingerprint,
    last_token_states,
    layer_record,
    next_words,
    organism_world_of,
)
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.trace.capture import temporary_hooks

PAPER = ("Liu, Ye, Xing, Zou, 'Reducing Hallucinations in Vision-Language Models via Latent Space Steering' "
         "(VTI), arXiv 2410.15778 (ICLR 2025); code shengliu66/VTI@bb5dfee")


# --------------------------------------------------------------------------------------- the rotation

def rotate_towards(x: torch.Tensor, direction: torch.Tensor, step: float | torch.Tensor, *,
                   adaptive: bool = False) -> torch.Tensor:
    """``normalize(normalize(x) + step * normalize(direction)) * ||x||`` over the last dim.

    ``adaptive`` multiplies ``step`` by ``1 + max(0, cos(x, -direction))`` per token (VISTA's ``lambda_sim``).
    ``direction`` broadcasts against ``x`` (``[d]``, ``[T, d]`` or ``[B, 1, d]``).

    >>> y = rotate_towards(torch.randn(2, 3, 8), torch.randn(8), 0.5)
    >>> y.shape
    torch.Size([2, 3, 8])
    """
    norm = x.norm(dim=-1, keepdim=True)
    unit = x / norm.clamp_min(1e-6)
    d = direction.to(x.dtype) / direction.to(x.dtype).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    lam = step
    if adaptive:
        lam = step * (1.0 + (-(unit * d).sum(-1, keepdim=True)).clamp_min(0.0))
    y = unit + lam * d
    return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-6) * norm


@dataclass
class RotateTowards(Add):
    """Engine intervention: norm-preserving rotation of each token towards ``vector`` by ``alpha`` in
    unit-vector space (VTI's ``VTILayer``). ``alpha=0`` is the identity."""

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = rotate_towards(x, self.vector.to(x.device), float(self.alpha))
        return out if mask is None else torch.where(mask.bool(), out, x)


# --------------------------------------------------------------------------------------- vision side

def vision_layers(model: Any) -> nn.ModuleList:
    """The vision encoder's blocks: the longest ``ModuleList`` in the vision tower (as VTI finds them)."""
    tower = model.adapter.vision_tower
    if tower is None:
        raise ValueError("VTI's visual direction needs a vision-language model")
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"no block list found in the vision tower {type(tower).__name__}")
    return max(lists, key=len)


def _mlp_of(block: nn.Module) -> nn.Module:
    for name in ("mlp", "ffn", "feed_forward"):
        if hasattr(block, name):
            return getattr(block, name)
    raise ValueError(f"no MLP found in vision block {type(block).__name__}")


def mask_patches(pixels: torch.Tensor, patch: int, ratio: float, rng: np.random.Generator) -> torch.Tensor:
    """A copy of ``pixels [3, H, W]`` with ``int(ratio * n_patches)`` random patches set to the per-channel
    spatial mean of the (normalised) image, as VTI's ``mask_patches``."""
    _, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    n_mask = int(ratio * rows * cols)
    out = pixels.clone()
    mean = pixels.mean(dim=(1, 2))
    for idx in rng.permutation(rows * cols)[:n_mask]:
        r, c = divmod(int(idx), cols)
        out[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = mean[:, None, None]
    return out


@torch.no_grad()
def _vision_states(model: Any, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``[n, n_layers_v, T_v, d_v]`` outputs of every vision encoder block (embeddings dropped)."""
    tower = model.adapter.vision_tower
    outs = []
    for s in range(0, pixels.shape[0], batch):
        hs = tower(pixels[s:s + batch].to(model.device, model.dtype), output_hidden_states=True).hidden_states
        outs.append(torch.stack([h.float().cpu() for h in hs[1:]], 1))
    return torch.cat(outs)


def mean_plus_pc1(diffs: torch.Tensor) -> torch.Tensor:
    """``diffs [N, ...]`` -> mean over N + unit first principal component (sign: largest |score| positive)."""
    flat = diffs.reshape(diffs.shape[0], -1).double()
    mean = flat.mean(0)
    centred = flat - mean
    if diffs.shape[0] < 2 or float(centred.norm()) == 0.0:
        return mean.float().reshape(diffs.shape[1:])
    u, _, vh = torch.linalg.svd(centred, full_matrices=False)
    pc1 = vh[0] * torch.sign(u[u[:, 0].abs().argmax(), 0])  # svd_flip on u, as VTI's pca.py
    return (mean + pc1).float().reshape(diffs.shape[1:])


def visual_direction(model: Any, images: Sequence[Any], *, mask_ratio: float = 0.99, num_trials: int = 50,
                     seed: int = FIT_SEED) -> torch.Tensor:
    """``[n_layers_v, T_v, d_v]`` VTI visual direction: mean + PC1 of (masked-average - clean) states."""
    rng = np.random.default_rng(seed)
    pixels = model.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"].float()
    patch = int(model.adapter.vision_tower.config.patch_size)
    diffs = []
    for img in pixels:
        masked = torch.stack([mask_patches(img, patch, mask_ratio, rng) for _ in range(num_trials)])
        stable = _vision_states(model, masked).mean(0)
        clean = _vision_states(model, img[None])[0]
        diffs.append(stable - clean)
    return mean_plus_pc1(torch.stack(diffs))


def vision_hooks(directions: torch.Tensor, step: float):
    """``hooks(model)`` context manager rotating every vision block's MLP output towards its per-token
    direction (``directions [n_layers_v, T_v, d_v]``); hooks are always removed (``temporary_hooks``)."""
    if not (math.isfinite(step) and bool(torch.isfinite(directions).all())):
        raise ValueError("the VTI vision direction or step contains NaN or inf (from a damaged saved fit? refit VTI)")

    @contextmanager
    def install(model: Any) -> Iterator[None]:
        blocks = vision_layers(model)
        if len(blocks) != directions.shape[0]:
            raise ValueError(f"visual direction has {directions.shape[0]} layers but the vision tower has "
                             f"{len(blocks)}")
        forward = []
        for k, block in enumerate(blocks):
            def hook(_m: Any, _a: Any, out: torch.Tensor, _d: torch.Tensor = directions[k]) -> torch.Tensor:
                if out.shape[-2:] != _d.shape:  # a differently sized image: the per-token direction does not fit
                    raise ValueError(f"VTI visual direction is [{_d.shape[0]} tokens, {_d.shape[1]}] but the "
                                     f"vision tower produced {tuple(out.shape)}")
                return rotate_towards(out, _d.to(out.device), step)
            forward.append((_mlp_of(block), hook))
        with temporary_hooks(forward):
            yield

    return install


# --------------------------------------------------------------------------------------- organism data

def organism_caption_pairs(world: Any, n: int = 48, seed: int = FIT_SEED) -> list[tuple[str, str, Any]]:
    """(correct caption prompt, hallucinated caption prompt, image): an anchor without its partner plus 0-1
    unpaired objects; the negative inserts the absent partner (random colour) in the caption's kind order."""
    from haltrace.organism import tasks

    rng = np.random.default_rng(seed)
    cfg = world.config
    out = []
    for _ in range(n):
        scene, anchor = tasks.fit_anchor_scene(world, rng, max_other=1)
        partner = world.partner[anchor]
        colours = {o.kind: o.colour for o in scene.objects}
        colours[partner] = str(cfg.colours[int(rng.integers(len(cfg.colours)))])
        bad = " ".join(f"{k} {colours[k]}" for k in cfg.kinds if k in colours)
        prefix = tasks.IMAGE_PREFIX + tasks.CAPTION_PROMPT + " "
        out.append((prefix + world.caption_text(scene), prefix + bad, world.render(scene, rng)))
    return out


def organism_pope_fit(world: Any, n: int = 64, seed: int = FIT_SEED + 7) -> list[tuple[str, Any, str]]:
    """(prompt, image, label) POPE-style fit questions: the present object (yes) and the absent partner (no)."""
    from haltrace.organism import tasks

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene, anchor = tasks.fit_anchor_scene(world, rng, max_other=2)
        image = world.render(scene, rng)
        present = sorted(scene.kinds)[int(rng.integers(len(scene.kinds)))]
        out.append((tasks.IMAGE_PREFIX + tasks.yesno_prompt(present), image, "yes"))
        out.append((tasks.IMAGE_PREFIX + tasks.yesno_prompt(world.partner[anchor]), image, "no"))
    return out


def pope_rates(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """False-yes rate on absent objects and recall on present ones (POPE's parsing: 'no' words are no)."""
    from haltrace.evals.pope import parse_pope_answer

    pred = [parse_pope_answer(a) for a in answers]
    neg = [p for p, lab in zip(pred, labels, strict=True) if lab == "no"]
    pos = [p for p, lab in zip(pred, labels, strict=True) if lab == "yes"]
    return {"false_yes": float(np.mean([p == "yes" for p in neg])) if neg else 0.0,
            "recall": float(np.mean([p == "yes" for p in pos])) if pos else 0.0}


def fit_pope_scores(model: Any, fitted: FittedIntervention, questions: Sequence[tuple[str, Any, str]]
                    ) -> dict[str, float]:
    """Fit-set POPE rates with ``fitted`` applied (None: the unsteered model)."""
    prompts, images, labels = zip(*questions, strict=True)
    if fitted is None:
        return pope_rates(next_words(model, list(prompts), list(images)), labels)
    with fitted.apply(model):
        return pope_rates(next_words(model, list(prompts), list(images)), labels)


# --------------------------------------------------------------------------------------- the method

@register_method
class VTI(Method):
    """Visual and textual intervention: fixed mean+PC1 directions, norm-preserving rotation of MLP outputs.

    >>> fitted = VTI().fit(model, alpha_text=4.0, alpha_image=0.0)     # doctest: +SKIP
    """

    name = "vti"
    summary = "VTI: mean+PC1 visual (masked vs clean) and textual (correct vs hallucinated) directions, rotating MLP outputs"

    def fit(self, model: Any, data: dict | None = None, *, alpha_text: float | None = None,
            alpha_image: float | None = None, text_grid: Sequence[float] = (0.0, 1.0, 4.0, 16.0),
            image_grid: Sequence[float] = (0.0, 0.9, 4.0, 8.0, 16.0), max_recall_drop: float = 0.03,
            mask_ratio: float = 0.99, num_trials: int = 50, n_demos: int = 48,
            seed: int = FIT_SEED) -> FittedIntervention:
        """``data`` (default: built from the organism's world with ``seed``) is a dict with ``captions``: list
        of ``(correct_prompt, hallucinated_prompt, image)`` and optionally ``pope``: list of
        ``(prompt, image, "yes"|"no")`` for choosing the strengths."""
        if not model.is_vlm:
            raise ValueError("VTI needs a vision-language model")
        described = "user-supplied caption pairs"
        if data is None:
            world = organism_world_of(model)
            data = {"captions": organism_caption_pairs(world, n_demos, seed),
                    "pope": organism_pope_fit(world, seed=seed + 7)}
            described = (f"{n_demos} organism anchor-without-partner images, correct vs partner-inserted caption "
                         f"(numpy seed {seed}); {len(data['pope']) // 2} fit POPE images (seed {seed + 7})")
        pairs = list(data.get("captions") or [])
        if len(pairs) < 2:
            raise ValueError("VTI needs at least 2 (correct, hallucinated, image) caption pairs in data['captions']")
        good, bad, images = zip(*pairs, strict=True)
        pos = last_token_states(model, list(good), list(images))
        neg = last_token_states(model, list(bad), list(images))
        text_dir = mean_plus_pc1(pos - neg)  # [L, d]
        vis_dir = visual_direction(model, images, mask_ratio=mask_ratio, num_trials=num_trials, seed=seed)

        def build(a_txt: float, a_img: float) -> FittedIntervention:
            interventions = [RotateTowards(f"mlp_out.{layer}", text_dir[layer], alpha=0.1 * a_txt,
                                           positions="all", phase="both")
                             for layer in range(model.n_layers)] if a_txt else []
            hooks = vision_hooks(vis_dir, 0.1 * a_img) if a_img else None
            state = {"vision_direction": vis_dir, "vision_step": 0.1 * a_img} if a_img else {}
            return FittedIntervention(self.name, interventions, {}, hooks=hooks, state=state)

        selection: list[dict] = []
        if alpha_text is None or alpha_image is None:
            questions = data.get("pope")
            if not questions:
                raise ValueError("choosing alpha_text/alpha_image needs data['pope'] fit questions; or pass both")
            base = fit_pope_scores(model, None, questions)
            t_grid = [alpha_text] if alpha_text is not None else list(text_grid)
            i_grid = [alpha_image] if alpha_image is not None else list(image_grid)
            for a_txt in t_grid:
                for a_img in i_grid:
                    s = fit_pope_scores(model, build(a_txt, a_img), questions)
                    selection.append({"alpha_text": a_txt, "alpha_image": a_img, **s,
                                      "ok": base["recall"] - s["recall"] <= max_recall_drop})
            ok = [r for r in selection if r["ok"]] or [min(selection, key=lambda r: r["alpha_text"] + r["alpha_image"])]
            best = min(ok, key=lambda r: (round(r["false_yes"], 6), r["alpha_text"] + r["alpha_image"]))
            alpha_text, alpha_image = best["alpha_text"], best["alpha_image"]
            selection = [{"baseline": base}] + selection
        fitted = build(alpha_text, alpha_image)
        fitted.provenance = {
            "method": self.name, "paper": PAPER,
            "layers": {"text": [layer_record(f"mlp_out.{i}", f"direction from hidden_states[{i + 1}] (paper "
                                             f"index {i}), applied to layers[{i}].mlp output")
                                for i in range(model.n_layers)],
                       "vision": [f"vision block {k}: direction from vision hidden_states[{k + 1}], applied "
                                  f"to its MLP output" for k in range(vis_dir.shape[0])]},
            "alpha_text": alpha_text, "alpha_image": alpha_image,
            "step": "0.1 * alpha in unit-vector space (official VTILayer)",
            "positions": "all (text: every token incl. image tokens; vision: per-token direction)",
            "phase": "both",
            "mask_ratio": mask_ratio, "num_trials": num_trials,
            "text_direction_norm_by_layer": [float(v) for v in text_dir.norm(dim=-1)],
            "selection": selection,
            "selection_rule": f"min fit false-yes on partner questions s.t. recall drop <= {max_recall_drop}",
            "data": {"description": described, "n": len(pairs),
                     "fingerprint": fingerprint(list(good) + list(bad), images)},
        }
        return fitted

    def restore(self, state: dict[str, Any]) -> FittedIntervention:
        """The vision-tower hooks of a saved fit (the textual rotations are engine interventions, saved as such)."""
        hooks = vision_hooks(torch.as_tensor(state["vision_direction"], dtype=torch.float32),
                             float(state["vision_step"]))
        return FittedIntervention(self.name, [], {}, hooks=hooks, state=dict(state))
