"""Steering overhead: ``generate()`` of exactly 64 new tokens with an additive vector on every layer vs without.

Conditions, timed in the same run, interleaved in a rotating order within every repetition (so drift from
other processes on the machine hits all alike), after warm-up calls:

* ``bare``: ``model.hf.generate(..., min_new_tokens=64, max_new_tokens=64)``, greedy
* ``steered``: the same inside ``steer(model, *[Add(f"resid_post.{i}", v, alpha=0.5) for every i])`` with
  positions ``"all"`` and phase ``"both"`` (the engine's full path: sequence pre-hook + one hook per layer)
* ``no-op hooks`` (diagnostic): one forward pre-hook on the model plus one forward hook per layer that return
  ``None``: the floor that any hook-based engine pays in PyTorch

The overhead is the median over repetitions of (steered time / bare time within that repetition).
Goal <= 1.05x (1.03x ideal). Threads are fixed (``--threads``, default 1) so runs are comparable.

Models: the organism (``--organism`` or ``artifacts/organisms/shapes-llava``; random weights with the
shipped architecture if neither exists) with its image, and a random Llama 8 layers x 512 wide, batch 1.

Usage::

    HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_steer.py                  # full, writes RESULTS.md
    HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_steer.py --quick --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## Steering overhead"
NEW_TOKENS = 64
GOAL, IDEAL = 1.05, 1.03

from bench import paired  # noqa: E402
from bench.paired import median_and_quartiles, paired_ratios, paired_rounds  # noqa: E402
from haltrace.models import Model  # noqa: E402
from haltrace.steering import Add, steer  # noqa: E402


def organism_case(path: str | None) -> tuple[str, Model, dict[str, Any]]:
    """The trained organism (with one caption prompt and its image), or its architecture with random weights."""
    from haltrace.organism import tasks
    from haltrace.organism.processing import EOS, build_processor, build_vocab, n_image_tokens
    from haltrace.organism.train import PRESETS, build_model_config, encode_examples, load_world
    from haltrace.organism.world import ShapesWorld

    default = REPO / "artifacts" / "organisms" / "shapes-llava"
    folder = Path(path) if path else default
    if (folder / "config.json").exists():
        import haltrace

        model = haltrace.load(str(folder), device="cpu", dtype="float32")
        world, label = load_world(folder), f"organism {folder.name} (trained)"
    else:
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(0)
        world = ShapesWorld()
        model = Model.from_hf(LlavaForConditionalGeneration(build_model_config(world, PRESETS["default"])),
                              build_processor(world), name="organism-random")
        label = "organism architecture (random weights)"
    vocab = build_vocab(world)
    example = tasks.caption_set(world)[0]
    batch = encode_examples([example], vocab, n_image_tokens(world), with_targets=False)
    kwargs = dict(batch, eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return label, model, kwargs


def llama_case() -> tuple[str, Model, dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = Model.from_hf(LlamaForCausalLM(cfg).eval(), None, name="random-llama-8x512")
    ids = torch.randint(3, 2048, (1, 32))
    return "random Llama 8 layers x 512, batch 1, prompt 32", model, {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "eos_token_id": 2, "pad_token_id": 0}


def _noop_hooks(model: Model):
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        handles = [model.hf.register_forward_pre_hook(lambda *_a, **_k: None, with_kwargs=True)]
        handles += [layer.register_forward_hook(lambda *_a: None) for layer in model.adapter.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return ctx()


def measure(model: Model, kwargs: dict[str, Any], reps: int, warmup: int, min_seconds: float = 0.0,
            max_reps: int = 200) -> dict[str, Any]:
    """At least ``reps`` rounds, more (up to ``max_reps``) until ``min_seconds`` have passed: the organism's
    64-token generate takes ~0.08 s, and 15 pairs of it left the median +-3% from run to run."""
    from contextlib import nullcontext

    torch.manual_seed(1)
    vectors = [torch.randn(model.hidden_size) * 0.01 for _ in range(model.n_layers)]
    interventions = [Add(f"resid_post.{i}", v, alpha=0.5) for i, v in enumerate(vectors)]
    conditions: dict[str, Callable[[], Any]] = {
        "bare": nullcontext, "steered": lambda: steer(model, *interventions), "no-op hooks": lambda: _noop_hooks(model)}

    def run(name: str) -> float:
        with torch.inference_mode(), conditions[name]():
            start = time.perf_counter()
            out = model.hf.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)
            seconds = time.perf_counter() - start
        new = out.shape[1] - kwargs["input_ids"].shape[1]
        if new != NEW_TOKENS:
            raise RuntimeError(f"generated {new} tokens, expected exactly {NEW_TOKENS}")
        return seconds

    names = list(conditions)
    for _ in range(warmup):
        for name in names:
            run(name)
    times, rounds = paired_rounds(run, names, reps, min_seconds, max_reps)
    stats = {n: median_and_quartiles(r) for n, r in paired_ratios(times, "bare").items() if n != "bare"}
    return {"median_s": {n: statistics.median(t) for n, t in times.items()},
            "ratio": {n: m for n, (m, _, _) in stats.items()},
            "quartiles": {n: [q1, q3] for n, (_, q1, q3) in stats.items()}, "reps": rounds}


def section(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        HEADING, "",
        f"`bench/bench_steer.py` (`--reps {args.reps} --min-seconds {args.min_seconds:.0f} --warmup {args.warmup} "
        f"--threads {args.threads}`), "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs. `generate()` of exactly {NEW_TOKENS} new tokens "
        "(min_new_tokens = max_new_tokens), greedy, with `Add` at `resid_post.i` for every layer "
        "(positions all, phase both) vs without; conditions interleaved in a rotating order, ratio = median over "
        "repetitions of steered / bare within a repetition, [q1-q3] in brackets; at least `--reps` repetitions, "
        "more until a model has been timed `--min-seconds`. Goal <= 1.05x (1.03x ideal).", "",
        "| model | reps | bare median (s) | steered median (s) | steered / bare [q1-q3] | no-op hooks / bare | goal |",
        "|---|---:|---|---|---|---|---|",
    ]
    for label, r in results:
        ratio = r["ratio"]["steered"]
        verdict = "met (ideal)" if ratio <= IDEAL else "met" if ratio <= GOAL else "missed"
        q1, q3 = r["quartiles"]["steered"]
        lines.append(f"| {label} | {r['reps']} | {r['median_s']['bare']:.3f} | {r['median_s']['steered']:.3f} | "
                     f"{ratio:.3f}x [{q1:.2f}-{q3:.2f}] | {r['ratio']['no-op hooks']:.3f}x | {verdict} |")
    lines += ["", "`no-op hooks` installs the same number of hooks that do nothing: the part of the overhead "
              "that is PyTorch's hook dispatch, not the engine's work."]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """This bench's section of RESULTS.md (``HEADING``), the others kept."""
    paired.write_section(text, HEADING, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="minimum repetitions per model")
    parser.add_argument("--min-seconds", type=float, default=40.0,
                        help="keep adding repetitions (up to 200) until a model has been timed this long")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--organism", default=None, help="organism folder (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 1 warm-up")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup, args.min_seconds = 3, 1, 0.0
    torch.set_num_threads(args.threads)
    results = []
    for build in (lambda: organism_case(args.organism), llama_case):
        label, model, kwargs = build()
        r = measure(model, kwargs, args.reps, args.warmup, args.min_seconds)
        print(f"{label}: bare {r['median_s']['bare']:.3f}s steered {r['median_s']['steered']:.3f}s "
              f"ratio {r['ratio']['steered']:.3f}x (no-op hooks {r['ratio']['no-op hooks']:.3f}x)", flush=True)
        results.append((label, r))
    text = section(results, args)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
