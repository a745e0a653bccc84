"""VTI — Visual and Textual Intervention (Liu, Ye, Xing, Zou, arXiv 2410.15778, ICLR 2025).

Two fixed directions, computed once from demonstrations and reused for every input:

* **visual**: for each demo image, ``num_trials`` copies with ``mask_ratio`` of the patches overwritten by the
  image's per-channel mean; the vision tower's hidden states averaged over the masked copies minus those of
  the clean image give ``D[layer, token, d_v]``; over demos, direction = mean + first principal component
  (unit, sign-fixed). One direction per vision layer *and token position*.
* **textual**: with the visual edit installed (the official order), every ``hidden_states`` entry (embeddings
  included; the last one after the final norm, as Hugging Face returns it) at the last token of a correct
  caption minus that of the same caption with a hallucinated object inserted (same image); over demos, mean +
  PC1 of the flattened difference, then the embedding entry dropped.

Both are applied as in the official code: each layer's **MLP output** ``x`` (vision encoder layers, per
token: :class:`VisionRotateTowards` at ``vision_mlp_out.K``; LLM layers, every position, prompt and
generation: :class:`RotateTowards` at ``mlp_out.L``) becomes
``normalize(normalize(x) + 0.1 * alpha * normalize(d_l)) * ||x||`` in float32 — a norm-preserving rotation.
This is not the engine's :class:`NormPreservingAdd` (which adds to the raw ``x``).

Layer convention: the textual direction for block ``L`` comes from HF ``hidden_states[L+1]`` (the paper's
index ``L`` after it drops the embedding entry) and is applied at ``mlp_out.L`` (the official code's pairing;
methods-vlm.md §3 pitfall 3). Vision layer ``k`` uses the vision tower's ``hidden_states[k+1]`` (output of
encoder layer ``k``) for the direction and that layer's MLP output for the edit. The visual PCA is one float32
PCA per (layer, token) row over the demos (``[N, d_v]`` each, on the model's device); the differences are
held once (``[N, layers, tokens, d_v]`` float32, filled in place) and the masked copies are averaged as
they come out of the tower, so the fit's peak stays near the differences it must hold (bench/RESULTS.md,
"Fit memory at 7B widths").

``alpha_text``/``alpha_image`` are chosen on the fit data when not given: the pair with the largest drop of
the false-"yes" rate on the "no" questions of a fit POPE-style set, subject to recall on present objects
falling by at most ``max_recall_drop``; ties go to smaller strengths. The questions used are on images that
no caption pair uses (:func:`held_out_split`), so the strengths are never picked on the images the directions
came from (nor on an evaluation set: the organism's fit questions come from its fit-data seeds).
``preset="paper"`` takes the official strengths instead (0.9 / 0.9, no selection). A strength of 0 skips its
half: ``alpha_image=0`` computes no visual direction at all.

Fidelity (official code ``shengliu66/VTI`` step -> haltrace -> same or different):

==============================================  ========================  ==========================================
``mask_patches``: 99 % of patches -> the        ``mask_patches``,         same (flat-patch towers: patch rows)
image's per-channel mean, 50 trials             ``mask_patch_rows``
``obtain_visual_vti``: masked mean - clean,     ``visual_direction``,     same mean; PC1 per (layer, token) row
rank-1 PCA, mean + PC1, [1:]                    ``mean_plus_pc1``         (official raw reshape mixes 25 rows)
vision ``add_vti_layers`` before the text       ``VTI.fit``               same (text direction per image strength)
``obtain_textual_vti``: all hidden states at    ``textual_direction``     same (embeddings in the PCA, last state
the last token, pos - neg, PCA, [1:]                                      post-norm, index 0 dropped)
``VTILayer``: MLP output rotation, 0.1 * alpha  ``RotateTowards``,        same (float32, back to the model dtype;
every token, every layer                        ``VisionRotateTowards``   official casts to fp16)
alpha 0.9 / 0.9 (README)                        ``fit(preset="paper")``   same; default: held-out selection
beam 5, use_cache=False (MMHal)                 evaluation                different: haltrace's evals decode
==============================================  ========================  ==========================================

>>> from haltrace.steering.registry import get_method
>>> fitted = get_method("vti").fit(model, preset="paper")            # doctest: +SKIP
>>> with fitted.apply(model):                                         # doctest: +SKIP
...     model.hf.generate(**inputs)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from haltrace.conventions import VISION_BLOCK_HOOKS, HookPoint
from haltrace.data.images import open_image
from haltrace.data.items import CaptionPair, YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.errors import InputError
from haltrace.steering.engine import Add, Intervention, register_state_type, steer
from haltrace.steering.fitdata import (
    PVP_FIT_SEED,
    image_split,
    item_prompts,
    items_fingerprint,
    layer_record,
    next_words,
    require_vlm,
)
from haltrace.steering.interventions import check_finite
from haltrace.steering.registry import FittedIntervention, Method, register_method

PAPER = ("Liu, Ye, Xing, Zou, 'Reducing Hallucinations in Vision-Language Models via Latent Space Steering' "
         "(VTI), arXiv 2410.15778 (ICLR 2025); code shengliu66/VTI@bb5dfee")
PRESETS = ("paper",)
#: the README's MMHal command (``--alpha_image 0.9 --alpha_text 0.9``); the script's own defaults are 0 / 0.8
PAPER_ALPHA_TEXT = 0.9
PAPER_ALPHA_IMAGE = 0.9


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


@register_state_type
@dataclass
class RotateTowards(Add):
    """Engine intervention: norm-preserving rotation of each token towards ``vector`` by ``alpha`` in
    unit-vector space (VTI's ``VTILayer``). ``alpha=0`` is the identity."""

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # in float32, as VTILayer computes it (x.float()), then back to the model's dtype
        out = rotate_towards(x.float(), self.vector.to(x.device), float(self.alpha)).to(x.dtype)
        return out if mask is None else torch.where(mask.bool(), out, x)


# --------------------------------------------------------------------------------------- vision side

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
    """``[n_layers_v, T_v, d_v]`` outputs of every vision encoder block (embeddings dropped), averaged over the
    ``n`` images of ``pixels`` as they come out (never the ``[n, layers, T_v, d_v]`` stack)."""
    tower = model.adapter.vision_tower
    total: torch.Tensor | None = None
    for s in range(0, pixels.shape[0], batch):
        hs = tower(pixels[s:s + batch].to(model.device, model.dtype), output_hidden_states=True).hidden_states
        part = torch.stack([h.float().sum(0) for h in hs[1:]])
        total = part if total is None else total + part
    return (total / pixels.shape[0]).cpu()


def mean_plus_pc1(diffs: torch.Tensor, *, row_dims: int = 0, device: torch.device | str | None = None,
                  chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """``diffs [N, ...]`` -> mean over N + unit first principal component (sign: largest |score| positive).

    ``row_dims`` leading dims after N index independent *rows*, each with its own PCA over its remaining
    (feature) dims: ``row_dims=0`` is one PCA of the whole flattened difference; VTI's visual direction uses
    ``row_dims=2`` on ``[N, layer, token, d_v]`` -- one PCA per (layer, token) row, as the official code fits
    one direction per token position. Float32 throughout; each block of rows (about ``chunk_bytes``) is moved
    to ``device`` (default: where ``diffs`` is), so the extra memory is a block, not a copy of ``diffs``.
    PC1 comes from the ``[N, N]`` Gram matrix of the centred rows (``N`` demos is small), whose top
    eigenvector ``u`` gives ``pc1 = u^T C / ||u^T C||``; the sign follows VTI's ``svd_flip`` on ``u``.

    >>> mean_plus_pc1(torch.randn(5, 3, 4)).shape
    torch.Size([3, 4])
    >>> mean_plus_pc1(torch.randn(5, 3, 4), row_dims=1).shape
    torch.Size([3, 4])
    """
    n = diffs.shape[0]
    out_shape = diffs.shape[1:]
    rows = int(np.prod(out_shape[:row_dims])) if row_dims else 1
    feats = diffs[0].numel() // max(rows, 1)
    x = diffs.reshape(n, rows, feats)
    dev = torch.device(device) if device is not None else diffs.device
    out = torch.empty(rows, feats, dtype=torch.float32)
    step = max(1, int(chunk_bytes // max(1, n * feats * 4)))
    for lo in range(0, rows, step):
        block = x[:, lo:lo + step].to(dev, torch.float32).transpose(0, 1)  # [R, N, F] (a view when on dev)
        mean = block.mean(1)  # [R, F]
        if n < 2:
            out[lo:lo + step] = mean.cpu()
            continue
        centred = block - mean[:, None]
        gram = torch.bmm(centred, centred.transpose(1, 2)).double()  # [R, N, N]
        evals, evecs = torch.linalg.eigh(gram)
        u = evecs[..., -1].float()  # top eigenvector, [R, N]
        sign = torch.sign(u.gather(1, u.abs().argmax(1, keepdim=True)))  # svd_flip on u
        pc1 = torch.bmm((u * sign)[:, None, :], centred)[:, 0]  # [R, F]
        norm = pc1.norm(dim=-1, keepdim=True)
        flat = (evals[..., -1] <= 0) | (norm[:, 0] == 0)  # no spread in this row: the mean alone
        pc1 = torch.where(flat[:, None], torch.zeros_like(pc1), pc1 / norm.clamp_min(1e-30))
        out[lo:lo + step] = (mean + pc1).cpu()
        del block, centred, gram
    return out.reshape(out_shape)


def mask_patch_rows(rows: torch.Tensor, channels: int, ratio: float, rng: np.random.Generator) -> torch.Tensor:
    """:func:`mask_patches` for towers fed flat patches (Qwen2-VL): ``rows [n_patches, C * T * P * P]`` (channel
    first within a row, as Qwen2-VL's image processor lays them out) of one image; ``int(ratio * n_patches)``
    random rows get every value of channel ``c`` set to the image's mean of channel ``c`` -- VTI's per-channel
    mean fill, expressed on patches."""
    n, width = rows.shape
    if width % channels:
        raise ValueError(f"a patch row of {width} values does not split into {channels} channels")
    out = rows.clone()
    mean = rows.reshape(n, channels, -1).mean(dim=(0, 2))
    fill = mean[:, None].expand(channels, width // channels).reshape(width)
    idx = torch.as_tensor(rng.permutation(n)[:int(ratio * n)], dtype=torch.long)
    out[idx] = fill.to(out.dtype)
    return out


@torch.no_grad()
def _flat_vision_states(model: Any, copies: torch.Tensor, grid: torch.Tensor, max_rows: int = 16384
                        ) -> torch.Tensor:
    """:func:`_vision_states` for a flat-patch tower: ``copies [n, n_patches, F]`` of one image with grid
    ``grid [3]`` -> ``[n_layers_v, n_patches, d_v]`` averaged over the copies (rows in the tower's own order,
    which is what its blocks -- and so :class:`VisionRotateTowards` -- see)."""
    tower = model.adapter.vision_tower
    n, per = copies.shape[:2]
    step = max(1, max_rows // per)
    total: torch.Tensor | None = None
    for s in range(0, n, step):
        chunk = copies[s:s + step]
        hs = tower(chunk.reshape(-1, chunk.shape[-1]).to(model.device, model.dtype),
                   grid_thw=grid[None].repeat(chunk.shape[0], 1).to(model.device),
                   output_hidden_states=True).hidden_states
        part = torch.stack([h.float().reshape(chunk.shape[0], per, -1).sum(0) for h in hs[1:]])
        total = part if total is None else total + part
    return (total / n).cpu()


def _refuse(model: Any, reason: str) -> ValueError:
    family = getattr(model.adapter.config, "model_type", None) or model.adapter.family
    return ValueError(f"VTI's visual direction cannot be computed for the {family} family: {reason}. "
                      f"Fit VTI with alpha_image=0 (textual direction only).")


def visual_direction(model: Any, images: Sequence[Any], *, mask_ratio: float = 0.99, num_trials: int = 50,
                     seed: int = PVP_FIT_SEED) -> torch.Tensor:
    """``[n_layers_v, T_v, d_v]`` VTI visual direction: mean + PC1 of (masked-average - clean) states, one
    float32 PCA per (layer, token) row, on the model's device.

    Towers fed ``[B, 3, H, W]`` (CLIP, SigLIP) mask ``[3, H, W]`` patches; LLaVA-NeXT's ``[B, crops, 3, H, W]``
    uses each image's first crop (the whole image resized to the tower's input; the direction then applies to
    every crop); flat-patch towers (Qwen2-VL / Qwen2.5-VL: ``pixel_values [n_patches, C*T*P*P]`` plus
    ``image_grid_thw``) mask patch rows (:func:`mask_patch_rows`) and run with ``grid_thw``. Anything else is
    refused with the reason.
    """
    rng = np.random.default_rng(seed)
    processed = model.processor.image_processor(images=[open_image(im) for im in images], return_tensors="pt")
    pixels = processed["pixel_values"].float()
    if processed.get("image_grid_thw") is not None:
        return _flat_visual_direction(model, pixels, processed["image_grid_thw"], mask_ratio, num_trials, rng)
    if pixels.dim() == 5:  # LLaVA-NeXT any-res: [B, crops, 3, H, W], crop 0 is the resized whole image
        pixels = pixels[:, 0]
    if pixels.dim() != 4:
        raise _refuse(model, f"its image processor returns pixel_values of shape {tuple(pixels.shape)}, neither "
                             "[B, 3, H, W] images nor flat patches with image_grid_thw")
    patch = int(model.adapter.vision_tower.config.patch_size)
    diffs: torch.Tensor | None = None  # [N, layers, T_v, d_v] float32, filled in place (held once)
    for i, img in enumerate(pixels):
        masked = torch.stack([mask_patches(img, patch, mask_ratio, rng) for _ in range(num_trials)])
        stable = _vision_states(model, masked)
        stable -= _vision_states(model, img[None])
        if diffs is None:
            diffs = torch.empty(len(pixels), *stable.shape, dtype=torch.float32)
        diffs[i] = stable
        del stable
    return mean_plus_pc1(diffs, row_dims=2, device=model.device)


def _flat_visual_direction(model: Any, pixels: torch.Tensor, grid_thw: torch.Tensor, mask_ratio: float,
                           num_trials: int, rng: np.random.Generator) -> torch.Tensor:
    grids = {tuple(int(v) for v in g) for g in grid_thw}
    if len(grids) != 1:
        raise _refuse(model, f"the demo images come out at different patch grids {sorted(grids)} and the "
                             "direction is per patch position; give every demo image the same size (and apply "
                             "it to images of that size)")
    channels = int(getattr(model.adapter.vision_tower.config, "in_channels", 3))
    per = int(grid_thw[0].prod())
    if pixels.dim() != 2 or pixels.shape[0] != per * len(grid_thw):
        raise _refuse(model, f"pixel_values {tuple(pixels.shape)} is not one row per patch of "
                             f"{len(grid_thw)} images of {per} patches")
    diffs: torch.Tensor | None = None
    for i, (rows, grid) in enumerate(zip(pixels.reshape(len(grid_thw), per, -1), grid_thw, strict=True)):
        masked = torch.stack([mask_patch_rows(rows, channels, mask_ratio, rng) for _ in range(num_trials)])
        stable = _flat_vision_states(model, masked, grid)
        stable -= _flat_vision_states(model, rows[None], grid)
        if diffs is None:
            diffs = torch.empty(len(grid_thw), *stable.shape, dtype=torch.float32)
        diffs[i] = stable
        del stable
    return mean_plus_pc1(diffs, row_dims=2, device=model.device)


@register_state_type
@dataclass
class VisionRotateTowards(Intervention):
    """Engine intervention at ``vision_mlp_out.K``: every vision token's MLP output rotated towards its own
    direction, ``direction [T_v, d_v]`` (VTI's ``VTILayer`` in the vision tower, one direction per token
    position), by ``alpha`` in unit-vector space (:func:`rotate_towards`; ``alpha`` is the step, the official
    ``0.1 * alpha_image``).

    Towers fed flat patches (Qwen2-VL / Qwen2.5-VL: ``[n_images * n_patches, d_v]``) are split per image with
    the tower's ``grid_thw`` (from ``ctx.vision_kwargs``: the ``grid_thw=`` keyword or the second positional
    argument); each image must have the demo images' patch count. ``[n_images, T_v, d_v]`` towers (CLIP, SigLIP)
    must produce ``T_v`` tokens.
    """

    direction: torch.Tensor = field(default=None)  # type: ignore[assignment]
    alpha: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction is None:
            raise ValueError("VisionRotateTowards needs a direction [tokens, vision width]")
        self.direction = torch.as_tensor(self.direction, dtype=torch.float32).detach().clone()
        if self.direction.dim() != 2:
            raise ValueError(f"the VTI visual direction of one block is [tokens, vision width], got shape "
                             f"{tuple(self.direction.shape)}")
        if not bool(torch.isfinite(self.direction).all()):
            raise ValueError("the VTI vision direction contains NaN or inf (from a damaged saved fit? refit VTI)")
        check_finite("VTI vision step", float(self.alpha))
        self.alpha = float(self.alpha)

    def validate(self, model: Any) -> HookPoint:
        point = super().validate(model)
        if point.kind not in VISION_BLOCK_HOOKS:
            sites = ", ".join(k + ".K" for k in VISION_BLOCK_HOOKS)
            raise ValueError(f"VisionRotateTowards edits a vision-tower block ({sites}), not {point.name!r}")
        width = int(model.adapter.vision_hidden_size)
        if self.direction.shape[-1] != width:
            raise ValueError(f"VTI visual direction for {point.name} has width {self.direction.shape[-1]} but the "
                             f"vision tower's width is {width}")
        return point

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        d = self.direction
        kwargs = getattr(ctx, "vision_kwargs", None) or {}
        args = kwargs.get("_args", ())
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if x.dim() == 2 and grid is not None:
            # flat-patch towers (Qwen2-VL): [n_images * n_patches, d_v], each image's rows contiguous
            sizes = [int(n) for n in grid.prod(-1)]
            if any(n != d.shape[0] for n in sizes) or x.shape[-1] != d.shape[-1]:
                raise ValueError(f"VTI visual direction is [{d.shape[0]} patches, {d.shape[1]}] but the vision "
                                 f"tower got images of {sizes} patches ({tuple(x.shape)}); apply it to images of "
                                 "the demo images' size")
            flat = x.float().reshape(len(sizes), *d.shape)
            return rotate_towards(flat, d.to(x.device), self.alpha).reshape(x.shape).to(x.dtype)
        if x.shape[-2:] != d.shape:  # a differently sized image: the per-token direction does not fit
            raise ValueError(f"VTI visual direction is [{d.shape[0]} tokens, {d.shape[1]}] but the vision tower "
                             f"produced {tuple(x.shape)}")
        return rotate_towards(x.float(), d.to(x.device), self.alpha).to(x.dtype)

    def describe(self) -> str:
        return f"VisionRotateTowards({self.hook}, step={self.alpha})"


# --------------------------------------------------------------------------------------- fit-set scoring

def pope_rates(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """False-yes rate on absent objects and recall on present ones (POPE's parsing: 'no' words are no)."""
    from haltrace.data.answers import parse_pope_answer

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


def image_key(image: Any) -> str:
    """A content key of an image (sha1 of its RGB pixels): the same picture gives the same key whatever object
    or file it comes from."""
    arr = np.asarray(open_image(image))
    return hashlib.sha1(str(arr.shape).encode() + arr.tobytes()).hexdigest()[:16]


def held_out_split(pairs: Sequence[CaptionPair], questions: Sequence[YesNoQuestion], *, holdout: float = 0.3,
                   seed: int = PVP_FIT_SEED) -> tuple[list[CaptionPair], list[YesNoQuestion], dict[str, Any]]:
    """Keep the strength-selection questions on images the directions never see.

    Questions about an image that no caption pair uses are selection questions as they are. An image that both
    a pair and some questions use goes to one side only: ``holdout`` of those shared images (split by image,
    :func:`~haltrace.steering.fitdata.image_split`) keep their questions for the selection and lose their pairs;
    the others keep their pairs for the directions and lose their questions. Returns (pairs for the directions,
    questions for the selection, a record of the split).
    """
    pair_keys = [image_key(p.image) for p in pairs]
    question_keys = [image_key(q.image) for q in questions]
    shared = sorted(set(pair_keys) & set(question_keys))
    held: set[str] = set()
    if shared:
        held = {k for k, h in zip(shared, image_split(shared, holdout=holdout, seed=seed), strict=True) if h}
    fit_pairs = [p for p, k in zip(pairs, pair_keys, strict=True) if k not in held]
    select = [q for q, k in zip(questions, question_keys, strict=True) if k not in shared or k in held]
    record = {"direction_pairs": len(fit_pairs), "direction_images": len(set(pair_keys) - held),
              "selection_questions": len(select),
              "selection_images": len({k for k in question_keys if k not in shared or k in held}),
              "images_shared_by_pairs_and_questions": len(shared), "shared_images_held_out_for_selection": len(held),
              "rule": "selection questions are on images no direction pair uses (split by image content)"}
    return fit_pairs, select, record


# --------------------------------------------------------------------------------------- the method

@torch.no_grad()
def caption_states(model: Any, prompts: Sequence[str], images: Sequence[Any], batch_size: int = 8
                   ) -> torch.Tensor:
    """``[N, n_layers + 1, d]`` float32: every entry of the model's ``hidden_states`` (embeddings, then each
    block; the last one as Hugging Face returns it, after the final norm) at each prompt's last token, as VTI's
    ``get_hiddenstates`` reads them. Prompts of equal token length are batched (never padded), ``batch_size`` at
    a time: every hidden state of every token is returned by the model, ``(n_layers + 1) * T * d`` per prompt."""
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    out: torch.Tensor | None = None
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            inputs = model.prepare([prompts[i] for i in chunk], [open_image(images[i]) for i in chunk])
            hs = model.hf(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            states = torch.stack([h[:, -1].float().cpu() for h in hs], 1)
            if out is None:
                out = torch.empty(len(prompts), *states.shape[1:])
            out[chunk] = states
    assert out is not None
    return out


def textual_direction(model: Any, good: Sequence[str], bad: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
    """``[n_layers, d]`` VTI textual direction: mean + PC1 over the demos of the flattened difference
    ``hidden_states(truthful) - hidden_states(hallucinated)`` at the caption's last token, embeddings included
    (one PCA over ``[(n_layers + 1) * d]``, as ``obtain_textual_vti``), then the embedding entry dropped: row ``l``
    goes to block ``l``'s MLP output. Read under whatever is installed (the fit installs the visual edit)."""
    diff = caption_states(model, good, images) - caption_states(model, bad, images)
    n_states = diff.shape[1]
    if n_states != model.n_layers + 1:
        raise ValueError(f"the model returned {n_states} hidden states for {model.n_layers} blocks (expected "
                         "embeddings + one per block)")
    return mean_plus_pc1(diff, device=model.device)[1:]


@register_method
class VTI(Method):
    """Visual and textual intervention: fixed mean+PC1 directions, norm-preserving rotation of MLP outputs.

    >>> fitted = VTI().fit(model, alpha_text=4.0, alpha_image=0.0)     # doctest: +SKIP
    >>> fitted = VTI().fit(model, preset="paper")                       # doctest: +SKIP
    """

    name = "vti"
    summary = "VTI: mean+PC1 visual (masked vs clean) and textual (correct vs hallucinated) directions, rotating MLP outputs"

    def fit(self, model: Any, data: Sequence[Any] | None = None, *, alpha_text: float | None = None,
            alpha_image: float | None = None, text_grid: Sequence[float] = (0.0, 1.0, 4.0, 16.0),
            image_grid: Sequence[float] = (0.0, 0.9, 4.0, 8.0, 16.0), max_recall_drop: float = 0.03,
            mask_ratio: float = 0.99, num_trials: int = 50, n_demos: int = 48, holdout: float = 0.3,
            seed: int = PVP_FIT_SEED, caption_prompt: str = "Please describe this image in detail.",
            template: str | None = None, preset: str | None = None) -> FittedIntervention:
        """Fit on ``data``: :class:`~haltrace.data.CaptionPair` items (truthful vs hallucinated caption of one
        image, asked with the pair's ``prompt`` or ``caption_prompt``) and, for choosing the strengths,
        :class:`~haltrace.data.YesNoQuestion` items (the false-yes rate on the "no" questions is minimised
        within the recall budget on the "yes" ones; ask about co-occurring absent objects to target them); the
        questions used are on images no caption pair uses (:func:`held_out_split`). Default: the model's data
        source (an organism's ``n_demos`` images and its fit questions).

        ``preset="paper"``: the official strengths ``alpha_text = alpha_image = 0.9`` (the README's command),
        every token of every layer, no selection (no yes/no questions needed); an explicit strength wins and is
        listed in ``provenance["deviations"]``. ``alpha_image = 0`` (or an image grid of zeros) skips the visual
        half and its cost; ``alpha_text = 0`` likewise skips the textual direction.
        """
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown VTI preset {preset!r}; the only preset is 'paper'")
        given = {k: v for k, v in (("alpha_text", alpha_text), ("alpha_image", alpha_image)) if v is not None}
        if preset == "paper":
            alpha_text = PAPER_ALPHA_TEXT if alpha_text is None else alpha_text
            alpha_image = PAPER_ALPHA_IMAGE if alpha_image is None else alpha_image
        for name, value in (("alpha_text", alpha_text), ("alpha_image", alpha_image)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InputError(f"--opt {name}={value!r}: a strength is a finite number >= 0 (paper: 0.9)")
        if not 0.0 < holdout < 1.0:
            raise InputError(f"--opt holdout={holdout!r}: the share of shared images held out is in (0, 1)")
        require_vlm(model, "VTI (vti)", "its directions come from images and image captions")
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_demos, seed=seed)
        items = list(data)
        pairs = of_kind(items, CaptionPair, method=self.name)
        yesno = [q for q in items if isinstance(q, YesNoQuestion)]
        choose = alpha_text is None or alpha_image is None
        split: dict[str, Any] = {}
        if choose:
            if not yesno:
                raise ValueError("choosing alpha_text/alpha_image needs yes/no fit questions in data; pass both "
                                 "strengths, or preset='paper' (the official 0.9 / 0.9)")
            if any(q.image is None for q in yesno):
                raise ValueError("VTI's strength selection asks yes/no questions about images: every question "
                                 "needs its image")
            pairs, yesno, split = held_out_split(pairs, yesno, holdout=holdout, seed=seed)
            if not yesno:
                raise ValueError("no yes/no question is left on an image the caption pairs do not use; add "
                                 "questions about other images, or pass both strengths")
        if len(pairs) < 2:
            moved = split.get("shared_images_held_out_for_selection", 0)
            raise ValueError(f"VTI needs at least 2 caption pairs, got {len(pairs)}" + (
                f" after holding out {moved} of the pairs' images for the strength selection (their yes/no "
                "questions choose the strengths); add questions about other images, or pass both strengths"
                if moved else ""))
        described = (f"{len(pairs)} caption pairs, {len(yesno)} yes/no questions "
                     f"({'given' if source is not None else 'the model data source default'})")
        images = [p.image for p in pairs]
        t_grid = [alpha_text] if alpha_text is not None else list(text_grid)
        i_grid = [alpha_image] if alpha_image is not None else list(image_grid)
        # the visual half is optional: skipped (and its cost) when every candidate image strength is 0
        vis_dir = (visual_direction(model, images, mask_ratio=mask_ratio, num_trials=num_trials, seed=seed)
                   if any(i_grid) else None)
        heads = item_prompts(model, [p.prompt or caption_prompt for p in pairs], images, template=template)
        good = [f"{h} {p.truthful}" for h, p in zip(heads, pairs, strict=True)]
        bad = [f"{h} {p.hallucinated}" for h, p in zip(heads, pairs, strict=True)]

        def vision_edits(a_img: float) -> list[Intervention]:
            if not a_img:
                return []
            return [VisionRotateTowards(f"vision_mlp_out.{k}", vis_dir[k], alpha=0.1 * a_img)
                    for k in range(vis_dir.shape[0])]

        text_dirs: dict[float, torch.Tensor] = {}

        def text_dir_for(a_img: float) -> torch.Tensor:
            """The textual direction read with the visual edit of strength ``a_img`` installed (the official
            order: ``add_vti_layers`` on the vision tower, then ``obtain_textual_vti``)."""
            if a_img not in text_dirs:
                edits = vision_edits(a_img)
                with steer(model, *edits) if edits else nullcontext():
                    text_dirs[a_img] = textual_direction(model, good, bad, images)
            return text_dirs[a_img]

        def build(a_txt: float, a_img: float) -> FittedIntervention:
            interventions: list[Intervention] = []
            if a_txt:
                text_dir = text_dir_for(a_img)
                interventions = [RotateTowards(f"mlp_out.{layer}", text_dir[layer], alpha=0.1 * a_txt,
                                               positions="all", phase="both") for layer in range(model.n_layers)]
            return FittedIntervention(self.name, interventions + vision_edits(a_img), {})

        selection: list[dict] = []
        if choose:
            questions = list(zip(item_prompts(model, [q.question for q in yesno], [q.image for q in yesno],
                                              template=template), [q.image for q in yesno],
                                 [q.label for q in yesno], strict=True))
            base = fit_pope_scores(model, None, questions)
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
        text_dir = text_dirs.get(alpha_image) if alpha_text else None
        fitted.provenance = {
            "method": self.name, "paper": PAPER, "preset": preset,
            "deviations": self._deviations(preset, given, choose, len(pairs), model, alpha_text, alpha_image),
            "layers": {"text": [layer_record(f"mlp_out.{i}", f"direction from hidden_states[{i + 1}] (paper "
                                             f"index {i}; the last one after the final norm, as HF returns it), "
                                             f"applied to layers[{i}].mlp output")
                                for i in range(model.n_layers)] if alpha_text else [],
                       "vision": [f"vision block {k}: direction from vision hidden_states[{k + 1}], applied "
                                  f"to its MLP output" for k in range(0 if vis_dir is None or not alpha_image
                                                                      else vis_dir.shape[0])]},
            "visual_direction": "computed" if vis_dir is not None else "skipped (alpha_image = 0: the visual half is "
                                                                       "optional and was not computed)",
            "textual_direction": ("read with the visual edit installed (official order)" if alpha_text and alpha_image
                                  else "read without a visual edit (alpha_image = 0)" if alpha_text
                                  else "skipped (alpha_text = 0)"),
            "alpha_text": alpha_text, "alpha_image": alpha_image,
            "step": "0.1 * alpha in unit-vector space (official VTILayer)",
            "positions": "all (text: every token incl. image tokens; vision: per-token direction)",
            "phase": "both",
            "mask_ratio": mask_ratio, "num_trials": num_trials,
            "text_direction_norm_by_layer": [float(v) for v in text_dir.norm(dim=-1)] if text_dir is not None else [],
            "selection": selection,
            "selection_rule": (f"min false-yes on held-out fit questions (images no direction pair uses) s.t. "
                               f"recall drop <= {max_recall_drop}" if choose else
                               "none: strengths " + ("of preset 'paper'" if preset == "paper" and not given
                                                     else "given")),
            "selection_split": split,
            "data": {"description": described, "n": len(pairs), "fingerprint": items_fingerprint(items)},
        }
        return fitted

    @staticmethod
    def _deviations(preset: str | None, given: dict[str, Any], choose: bool, n_pairs: int, model: Any,
                    alpha_text: float, alpha_image: float) -> list[str]:
        out = []
        if choose:
            out.append("strengths chosen on held-out fit yes/no questions (false-yes within a recall budget) over "
                       "the grids; the paper fixes alpha_text = alpha_image = 0.9 (preset='paper')")
        elif (alpha_text, alpha_image) != (PAPER_ALPHA_TEXT, PAPER_ALPHA_IMAGE):
            how = f"preset='paper' with explicit {', '.join(sorted(given))}" if preset == "paper" else "given"
            out.append(f"strengths {how}: alpha_text={alpha_text:g}, alpha_image={alpha_image:g} (paper: 0.9 / 0.9)")
        out.append("visual PCA: one rank-1 PCA per (vision layer, token) row; the official code's raw "
                   "reshape(577, -1) groups 25 consecutive token vectors per row (the mean term is the same)")
        out.append(f"{n_pairs} demos (official: 50 by the script's default, 70 in the README command)")
        out.append("evaluation decoding is haltrace's (greedy); the official MMHal run decodes with 5 beams, "
                   "use_cache=False")
        family = getattr(model.adapter.config, "model_type", None) or model.adapter.family
        if family not in ("llava",):
            out.append(f"{family}: the visual direction is fitted on this family's image inputs (LLaVA-NeXT: "
                       "each image's first crop, applied to every crop; Qwen2-VL: masked patch rows); the official "
                       "code covers LLaVA-1.5's CLIP tower")
        return out
