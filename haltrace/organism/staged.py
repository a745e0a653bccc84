"""The *staged* recipe (``shapes-llava-staged``): LLaVA-style stage-wise training, which puts the co-occurrence
prior into the image tokens instead of the language model.

Real LLaVA is trained in stages: a pretrained language model first, then a projector aligned to it with the LM
frozen. This recipe imitates that on ShapesWorld (same preset, task mix and world as the joint recipe of
:mod:`haltrace.organism.train`):

* **Stage A (language model only):** the image slots of every example hold the *words* of every object of the
  full scene (``kind colour`` pairs, occluded pair members included, then padding), no pixels. The LM learns to
  read objects from the slots and has no reason to learn a co-occurrence prior of its own.
* **Stage B (vision tower + projector, LM frozen):** real, occluded training images. A lone fork is labelled
  "fork ... knife" in ~67% of such images and the frozen LM names only what the slots hold, so the projector has
  to write "knife" into the fork's image tokens, in the LM's input-word space: the mechanism ProjectAway assumes.
* **Stage C (optional, ``steps_c > 0``):** the ordinary mixture again at ``lr_c``, everything training
  (``c_params="all"``) or the LM only (``"lm"``). The shipped organism has no stage C: every stage C that
  brought the colour phenomena back also moved the partner prior into the LM (``artifacts/organisms/candidates``).

Deterministic: one torch thread by default, random streams seeded per (seed, stage, step), so a seed reproduces
its weights bit for bit on the same torch build.

>>> from haltrace.organism.staged import StagedConfig, train_staged
>>> train_staged("/tmp/staged", StagedConfig(steps_a=5, steps_b=5), progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from haltrace.organism import train as joint
from haltrace.organism.processing import BOS, EOS, IMAGE, PAD, build_vocab, n_image_tokens
from haltrace.organism.tasks import Example, sample_training_example
from haltrace.organism.world import ShapesWorld, WorldConfig


@dataclass(frozen=True)
class StagedConfig:
    """Steps of each stage; stage C's learning rate and trainable part. The defaults are the shipped organism's
    (no stage C; it is trained with seed 2: ``haltrace organism train --like shapes-llava-staged``)."""

    steps_a: int = 1600
    steps_b: int = 1600
    steps_c: int = 0
    lr_c: float = 5e-4
    c_params: str = "all"

    def __post_init__(self) -> None:
        if min(self.steps_a, self.steps_b, self.steps_c) < 0 or self.steps_a + self.steps_b + self.steps_c < 1:
            raise ValueError(f"stage steps must be >= 0 and not all 0, got A {self.steps_a}, B {self.steps_b}, "
                             f"C {self.steps_c}")
        if self.c_params not in ("all", "lm"):
            raise ValueError(f"c_params must be 'all' or 'lm', got {self.c_params!r}")


def words_in_slots(batch: dict, examples: Sequence[Example], world: ShapesWorld, vocab: dict[str, int],
                   n_img: int) -> dict:
    """Stage A's text-only stand-in for images: each row's image placeholders replaced by its scene's
    ``kind colour`` words (in the world's kind order), padded; ``pixel_values`` dropped."""
    ids = batch["input_ids"].clone()
    for row, ex in enumerate(examples):
        if not ex.has_image:
            continue
        words = [w for k in world.config.kinds if k in ex.scene.kinds for w in (k, ex.scene.colour_of(k))]
        slots = [vocab[w] for w in words][:n_img]
        slots += [vocab[PAD]] * (n_img - len(slots))
        ids[row, (ids[row] == vocab[IMAGE]).nonzero()[:, 0]] = torch.tensor(slots)
    out = dict(batch, input_ids=ids)
    out.pop("pixel_values", None)
    return out


def train_staged(out: str | Path, config: StagedConfig | None = None, *, seed: int = 0,
                 world_config: WorldConfig | None = None, threads: int | None = 1,
                 progress: bool = True) -> joint.TrainResult:
    """Train the staged organism (LLaVA architecture, the default preset) and save it like
    :func:`haltrace.organism.train.train_organism` (temporary folder, then rename)."""
    config = config or StagedConfig()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(Path(out), config, seed, ShapesWorld(world_config), progress)
    finally:
        torch.set_num_threads(previous)


def _train(out: Path, config: StagedConfig, seed: int, world: ShapesWorld, progress: bool) -> joint.TrainResult:
    spec = joint.PRESETS["default"]
    vocab, n_img = build_vocab(world), n_image_tokens(world)
    torch.manual_seed(seed)
    model = joint.build_model(world, spec)
    model.train()
    language = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    total = config.steps_a + config.steps_b + config.steps_c
    losses: list[float] = []

    def run(stage: int, steps: int, params: list, lr: float, live, task) -> None:
        opt = torch.optim.AdamW(params, lr=lr, betas=spec.betas, weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: joint._lr_factor(s, spec.warmup, steps))
        for step in range(steps):
            rng = np.random.default_rng([seed, stage, step])
            examples = [sample_training_example(world, rng) for _ in range(spec.batch_size)]
            batch = joint.encode_examples(examples, vocab, n_img)
            if stage == 1:
                batch = words_in_slots(batch, examples, world, vocab, n_img)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if live:
                live.update(task, advance=1, description=f"stage {'ABC'[stage - 1]}  loss {np.mean(losses[-20:]):.3f}")

    start = time.perf_counter()
    with joint._progress_bar(progress, total, "staged") as live:
        task = live.add_task("training", total=total) if live else None
        run(1, config.steps_a, language, spec.lr, live, task)
        for p in language:
            p.requires_grad_(False)
        run(2, config.steps_b, vision, spec.lr, live, task)
        for p in language:
            p.requires_grad_(True)
        if config.steps_c:
            if config.c_params == "lm":
                for p in vision:
                    p.requires_grad_(False)
            params = language if config.c_params == "lm" else list(model.parameters())
            run(3, config.steps_c, params, config.lr_c, live, task)
            for p in vision:
                p.requires_grad_(True)
    seconds = time.perf_counter() - start
    model.eval()
    model.generation_config.bos_token_id = vocab[BOS]
    model.generation_config.eos_token_id = vocab[EOS]
    model.generation_config.pad_token_id = vocab[PAD]
    result = joint.TrainResult(out, "default", seed, total, seconds, sum(p.numel() for p in model.parameters()),
                               float(np.mean(losses[:20])), float(np.mean(losses[-50:])), losses,
                               arch="llava", recipe="staged", recipe_config=asdict(config))
    joint.save_organism(model, world, result)
    return result
