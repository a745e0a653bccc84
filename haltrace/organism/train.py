"""Train a ShapesWorld organism from scratch in a real HF architecture: ``LlavaForConditionalGeneration`` (CLIP
tower + Llama; ``arch="llava"``) or ``Qwen2VLForConditionalGeneration`` (Qwen2-VL's patch-merging tower, M-RoPE;
``arch="qwen2_vl"``). This module is the *joint* recipe (every weight trains on the whole task mix from step 0);
:mod:`haltrace.organism.staged` is the LLaVA-style staged one.

Deterministic: the weights depend only on the preset, seed, step count and world config (same machine, same
torch build). Batches are generated on the fly from ``numpy.random.default_rng([seed, step])``.

>>> from haltrace.organism.train import train_organism
>>> result = train_organism("/tmp/organism", preset="tiny", steps=20, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from haltrace.organism.processing import (
    ARCHES,
    BOS,
    EOS,
    PAD,
    QWEN_IMAGE,
    QWEN_MERGE,
    QWEN_PATCH_SIZE,
    QWEN_TEMPORAL,
    QWEN_VIDEO,
    QWEN_VISION_END,
    QWEN_VISION_START,
    build_vocab,
    image_token,
    n_image_tokens,
    normalise_images,
    qwen_patches,
    save_processor,
)
from haltrace.organism.tasks import TASK_MIX, Example, sample_training_example
from haltrace.organism.world import ShapesWorld, WorldConfig


@dataclass
class Preset:
    """Architecture and optimisation settings of one organism size."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_mlp: int
    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 50
    grad_clip: float = 1.0


PRESETS: dict[str, Preset] = {
    # The shipped organism (1.2 M parameters; ~0.17 s/step on one core). lr 1e-3 trains to a low loss; at 2e-3
    # every run stalled at loss 0.1-0.4 with priors too strong to steer (measured, see candidates/README.md).
    "default": Preset(128, 2, 4, 256, 128, 4, 4, 384, steps=3200, lr=1e-3),
    # A smoke-test organism: trains in about a minute, phenomena swing with the seed.
    "tiny": Preset(64, 1, 2, 128, 64, 2, 2, 192, steps=900, lr=3e-3),
}


@dataclass
class TrainResult:
    out: Path
    preset: str
    seed: int
    steps: int
    seconds: float
    n_parameters: int
    loss_first: float
    loss_last: float
    losses: list[float] = field(repr=False, default_factory=list)
    arch: str = "llava"
    recipe: str = "joint"
    recipe_config: dict = field(default_factory=dict)


def build_model(world: ShapesWorld, preset: Preset, arch: str = "llava"):
    """A freshly initialised HF model of the architecture (draws from torch's global generator)."""
    if arch == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration(build_qwen_config(world, preset))
    return LlavaForConditionalGeneration(build_model_config(world, preset))


def build_qwen_config(world: ShapesWorld, preset: Preset):
    """Qwen2-VL at the preset's sizes: 4-pixel patches merged 2x2 into the LM's width, M-RoPE sections summing
    to half the head width, untied embeddings (as the LLaVA organism)."""
    from transformers import Qwen2VLConfig

    vocab = build_vocab(world, "qwen2_vl")
    head_dim = preset.text_hidden // preset.text_heads
    half = head_dim // 2
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 32-wide heads: [4, 6, 6]
    text = dict(
        vocab_size=len(vocab), hidden_size=preset.text_hidden, intermediate_size=preset.text_mlp,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_heads, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0},
    )
    vision = dict(depth=preset.vision_layers, embed_dim=preset.vision_hidden, hidden_size=preset.text_hidden,
                  num_heads=preset.vision_heads, mlp_ratio=preset.vision_mlp // preset.vision_hidden,
                  in_channels=3, patch_size=QWEN_PATCH_SIZE, spatial_merge_size=QWEN_MERGE,
                  temporal_patch_size=QWEN_TEMPORAL)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=vocab[QWEN_IMAGE], video_token_id=vocab[QWEN_VIDEO],
        vision_start_token_id=vocab[QWEN_VISION_START], vision_end_token_id=vocab[QWEN_VISION_END],
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
    )


def build_model_config(world: ShapesWorld, preset: Preset) -> LlavaConfig:
    vocab = build_vocab(world)
    cfg = world.config
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden, intermediate_size=preset.vision_mlp,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=cfg.image_size, patch_size=8, num_channels=3, projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=preset.text_hidden, intermediate_size=preset.text_mlp,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_heads, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab[image_token("llava")],
        image_seq_length=n_image_tokens(world), projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )


def encode_examples(examples: Sequence[Example], vocab: dict[str, int], n_img: int,
                    with_targets: bool = True, arch: str = "llava") -> dict[str, torch.Tensor]:
    """Token ids straight from the vocabulary (identical to the processor's output; tested), right-padded.

    With targets, labels cover the answer words and EOS only. ``arch="qwen2_vl"`` wraps the image pads in
    ``<|vision_start|>`` / ``<|vision_end|>`` and adds ``image_grid_thw`` and ``mm_token_type_ids`` (M-RoPE).
    """
    qwen = arch == "qwen2_vl"
    image_block = [vocab[image_token(arch)]] * n_img
    if qwen:
        image_block = [vocab[QWEN_VISION_START], *image_block, vocab[QWEN_VISION_END]]
    rows, label_rows = [], []
    for ex in examples:
        prompt = [vocab[BOS]] + (image_block if ex.has_image else [])
        prompt += [vocab[w] for w in ex.prompt.split()]
        target = [vocab[w] for w in ex.target.split()] + [vocab[EOS]] if with_targets else []
        rows.append(prompt + target)
        label_rows.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vocab[PAD], dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_targets:
        batch["labels"] = labels
    images = [ex.image for ex in examples if ex.has_image]
    if images and qwen:
        flat, grid = qwen_patches(np.stack(images))
        batch["pixel_values"] = torch.from_numpy(flat)
        batch["image_grid_thw"] = torch.from_numpy(grid)
        batch["mm_token_type_ids"] = (ids == vocab[QWEN_IMAGE]).to(torch.int32)
    elif images:
        batch["pixel_values"] = torch.from_numpy(normalise_images(np.stack(images)))
    return batch


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_organism(
    out: str | Path,
    *,
    preset: str = "default",
    seed: int = 0,
    steps: int | None = None,
    world_config: WorldConfig | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    threads: int | None = 1,
    arch: str = "llava",
) -> TrainResult:
    """Train an organism and save it (model + processor + world config) to ``out`` with ``save_pretrained``.

    The folder is written to a temporary sibling and renamed, so ``out`` never holds a half-written model.
    ``threads`` fixes torch's intra-op threads (the shipped organism used 1): float sums depend on it, so the
    same seed reproduces the same weights only with the same thread count.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHES}")
    spec = PRESETS[preset]
    total = int(steps if steps is not None else spec.steps)
    if total < 1:
        raise ValueError(f"steps must be >= 1, got {total}")
    world = ShapesWorld(world_config)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out, world, spec, preset, seed, total, progress, on_step, arch)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out, world, spec, preset, seed, total, progress, on_step, arch="llava") -> TrainResult:
    vocab = build_vocab(world, arch)
    n_img = n_image_tokens(world, arch)
    torch.manual_seed(seed)
    model = build_model(world, spec, arch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.warmup, total))

    losses: list[float] = []
    start = time.perf_counter()
    bar = _progress_bar(progress, total, preset)
    with bar as live:
        task = live.add_task("training", total=total) if live else None
        for step in range(total):
            rng = np.random.default_rng([seed, step])
            batch = encode_examples([sample_training_example(world, rng) for _ in range(spec.batch_size)],
                                    vocab, n_img, arch=arch)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
            if live:
                live.update(task, advance=1, description=f"training  loss {np.mean(losses[-20:]):.3f}")
            if on_step:
                on_step(step, losses[-1])
    seconds = time.perf_counter() - start

    model.eval()
    model.generation_config.bos_token_id = vocab[BOS]
    model.generation_config.eos_token_id = vocab[EOS]
    model.generation_config.pad_token_id = vocab[PAD]
    result = TrainResult(Path(out), preset, seed, total, seconds, sum(p.numel() for p in model.parameters()),
                         float(np.mean(losses[:20])), float(np.mean(losses[-50:])), losses, arch=arch)
    save_organism(model, world, result)
    return result


def save_organism(model, world: ShapesWorld, result: TrainResult) -> None:
    out = Path(result.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        save_processor(world, tmp, result.arch)
        (tmp / "world.json").write_text(json.dumps(world.config.to_dict(), indent=2))
        training = {k: v for k, v in asdict(result).items() if k not in ("out", "losses")}
        if not training["recipe_config"]:
            training.pop("recipe_config")
        training["preset_config"] = asdict(PRESETS[result.preset])
        training["task_mix"] = dict(TASK_MIX)
        training["torch"] = torch.__version__
        training["threads"] = torch.get_num_threads()
        training["loss_every_100"] = [round(float(np.mean(result.losses[i:i + 100])), 4)
                                      for i in range(0, len(result.losses), 100)]
        (tmp / "training.json").write_text(json.dumps(training, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder should be readable
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_world(path: str | Path) -> ShapesWorld:
    """The world an organism folder was trained on."""
    file = Path(path) / "world.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {path} is not a ShapesWorld organism folder")
    return ShapesWorld(WorldConfig.from_dict(json.loads(file.read_text())))


def _progress_bar(enabled: bool, total: int, preset: str):
    if not enabled:
        from contextlib import nullcontext

        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{preset}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
