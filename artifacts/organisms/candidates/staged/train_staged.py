"""Prototype, not shipped: a LLaVA-style *staged* organism, for the image-side steering methods.

Run from the repository root with the project's venv (results of the runs made with it: ../README.md,
"Staged training")::

    .venv/bin/python artifacts/organisms/candidates/staged/train_staged.py OUT SEED STEPS_A STEPS_B [STEPS_C [LR_C [C_PARAMS [C_HIDE [A_OMIT]]]]]

* **Stage A (language model only):** the image slots of every example hold the *words* of every object in the
  full scene (``kind colour`` pairs, hidden pair members included, then padding), no pixels. The LM learns to
  read objects from the slots and has no reason to learn a co-occurrence prior of its own.
* **Stage B (vision tower + projector, LM frozen):** real occluded training images. A lone fork is labelled
  "fork ... knife" in ~67% of such images, and the frozen LM names only what the slots hold, so the projector
  has to write "knife" into the fork's image tokens, in the LM's input-word space: the mechanism ProjectAway
  assumes (hallucinated objects represented in the image tokens).
* **Stage C (optional, ``LR_C``):** the ordinary training mixture again, so the LM can pick up the colour
  prior's early-layer lead. ``C_PARAMS`` is ``all`` (default: everything trains; the longer it runs, the more
  of the partner prior moves into the LM) or ``lm`` (vision tower and projector stay frozen, so the image
  tokens keep what stage B wrote into them). ``C_HIDE`` sets the world's occlusion probability for stage C's
  data only (default: the world's own, 0.10).
* **A_OMIT** (default 0): the probability that stage A's slots leave out an object's colour word while the
  text still names the colour, so the LM learns to supply a kind's usual colour itself (the colour prior
  planted in the LM, without a stage C).

Same default preset, task mix and world as ``haltrace organism train``; random streams are seeded per stage and
step. One torch thread, so a seed reproduces its weights.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from haltrace.organism import train as T
from haltrace.organism.processing import BOS, EOS, IMAGE, PAD, build_vocab, n_image_tokens
from haltrace.organism.tasks import Example, sample_training_example
from haltrace.organism.world import ShapesWorld


def words_in_slots(batch: dict, examples: list[Example], world: ShapesWorld, vocab: dict[str, int],
                   n_img: int, omit: float = 0.0, rng: np.random.Generator | None = None) -> dict:
    """Stage A's text-only stand-in: image placeholders replaced by the scene's ``kind colour`` words; with
    probability ``omit`` an object's colour word is left out (drawn from ``rng``)."""
    ids = batch["input_ids"].clone()
    for row, ex in enumerate(examples):
        if not ex.has_image:
            continue
        words = [w for k in world.config.kinds if k in ex.scene.kinds
                 for w in ((k,) if omit and rng.random() < omit else (k, ex.scene.colour_of(k)))]
        slots = [vocab[w] for w in words][:n_img]
        slots += [vocab[PAD]] * (n_img - len(slots))
        ids[row, (ids[row] == vocab[IMAGE]).nonzero()[:, 0]] = torch.tensor(slots)
    out = dict(batch, input_ids=ids)
    out.pop("pixel_values", None)
    return out


def main(out: str, seed: int, steps_a: int, steps_b: int, steps_c: int = 0, lr_c: float = 5e-4,
         c_params: str = "all", c_hide: float | None = None, a_omit: float = 0.0) -> None:
    if c_params not in ("all", "lm"):
        raise ValueError(f"C_PARAMS must be 'all' or 'lm', got {c_params!r}")
    torch.set_num_threads(1)
    spec = T.PRESETS["default"]
    world = ShapesWorld()
    vocab, n_img = build_vocab(world), n_image_tokens(world)
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration(T.build_model_config(world, spec))
    model.train()

    def run(stage: int, total: int, params: list, lr: float, data_world: ShapesWorld = world) -> list[float]:
        opt = torch.optim.AdamW(params, lr=lr, betas=spec.betas, weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T._lr_factor(s, spec.warmup, total))
        losses: list[float] = []
        start = time.time()
        for step in range(total):
            rng = np.random.default_rng([seed, stage, step])
            examples = [sample_training_example(data_world, rng) for _ in range(spec.batch_size)]
            batch = T.encode_examples(examples, vocab, n_img)
            if stage == 1:
                batch = words_in_slots(batch, examples, world, vocab, n_img, a_omit, rng)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 200 == 0:
                print(f"stage {'ABC'[stage - 1]} step {step} loss {np.mean(losses[-50:]):.4f} "
                      f"{time.time() - start:.0f} s", flush=True)
        return losses

    language = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    start = time.time()
    losses = run(1, steps_a, language, spec.lr)
    for p in language:
        p.requires_grad_(False)
    losses += run(2, steps_b, vision, spec.lr)
    for p in language:
        p.requires_grad_(True)
    if steps_c:
        if c_params == "lm":
            for p in vision:
                p.requires_grad_(False)
        c_world = world if c_hide is None else ShapesWorld(replace(world.config, p_hide_pair=c_hide))
        losses += run(3, steps_c, language if c_params == "lm" else list(model.parameters()), lr_c, c_world)
        for p in vision:
            p.requires_grad_(True)
    model.eval()
    model.generation_config.bos_token_id = vocab[BOS]
    model.generation_config.eos_token_id = vocab[EOS]
    model.generation_config.pad_token_id = vocab[PAD]
    result = T.TrainResult(Path(out), "default", seed, steps_a + steps_b + steps_c, time.time() - start,
                           sum(p.numel() for p in model.parameters()), float(np.mean(losses[:20])),
                           float(np.mean(losses[-50:])), losses)
    T.save_organism(model, world, result)
    print(f"saved {out}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]) if len(a) > 4 else 0, float(a[5]) if len(a) > 5 else 5e-4,
         a[6] if len(a) > 6 else "all", float(a[7]) if len(a) > 7 and a[7] != "-" else None,
         float(a[8]) if len(a) > 8 else 0.0)
