"""Capture overhead of haltrace's three backends against a bare forward, plus harvest peak memory.

For each model, every repetition times (in a rotating order, so drift hits all alike) one bare no-grad forward
and one ``capture_with(model, inputs, every resid_post, positions=None, backend=...)`` per backend. Each
backend's overhead is the median over repetitions of (capture time / bare forward time in the same
repetition). Warm-up calls run first (TransformerLens boots its bridge and nnsight wraps the module there).

* ``hooks``: haltrace's torch-hooks backend (``haltrace.trace.capture``)
* ``transformer_lens``: ``TransformerBridge.run_with_cache(names_filter=[blocks.i.hook_resid_post])``
* ``nnsight``: ``NNsight(module).trace`` + ``.save()`` of every layer output. nnsight patches the module's
  forwards for good, so it runs on a module-tree copy that shares the weights; the bare forward of that
  wrapped copy is reported too (``nnsight-wrapped, no trace``).
* ``raw hooks``: diagnostic, a forward hook per layer that keeps a reference (no detach/clone/select): the
  floor for any hook-based capture.

Models: the organism (``artifacts/organisms/shapes-llava`` if present, else its architecture with random
weights), the tiny random Llama of the tests, and a random Llama 8 layers x 512 wide at seq 256, batch 4.
Harvest peak RSS at 1x / 10x data set size comes from ``bench/bench_harvest_memory.py`` (run as is).

The table is printed and written into ``bench/RESULTS.md`` under ``## Trace capture`` (atomically; the other
sections of that file are kept).

Usage::

    HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_trace.py            # full run
    HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_trace.py --quick    # smoke test, no file
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## Trace capture"

from bench import paired  # noqa: E402
from bench.paired import median_and_quartiles, paired_ratios, paired_rounds  # noqa: E402
from haltrace.models import Model  # noqa: E402
from haltrace.trace.backends import capture_with  # noqa: E402

GOAL, HARD_GOAL = 1.05, 1.10


# --- models --------------------------------------------------------------------------------------------------

def organism_case(batch: int) -> tuple[str, Model, dict[str, torch.Tensor]]:
    """The trained organism if its folder exists, else the same architecture with random weights."""
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.processing import build_processor, build_vocab
    from haltrace.organism.train import PRESETS, build_model_config
    from haltrace.organism.world import ShapesWorld

    world = ShapesWorld()
    try:
        path = resolve_organism("shapes-llava")
        trained = Path(path).is_dir()
    except Exception:
        trained = False
    if trained:
        import haltrace

        model = haltrace.load("shapes-llava", device="cpu", dtype="float32")
        label = "organism shapes-llava (trained)"
    else:
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(0)
        cfg = build_model_config(world, PRESETS["default"])
        model = Model.from_hf(LlavaForConditionalGeneration(cfg), build_processor(world), name="organism-random")
        label = "organism architecture (random weights; no artifacts/organisms/shapes-llava)"
    cfg = model.hf.config
    vocab = build_vocab(world)
    n_img, size = int(cfg.image_seq_length), int(world.config.image_size)
    words = torch.randint(8, len(vocab), (batch, 16))
    image = torch.full((batch, n_img), int(cfg.image_token_index))
    ids = torch.cat([torch.full((batch, 1), int(cfg.text_config.bos_token_id)), image, words], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, size, size)}
    return f"{label}, seq {ids.shape[1]}, batch {batch}", model, inputs


def tiny_llama_case() -> tuple[str, Model, Any]:
    from haltrace.models.tiny import build_tiny, build_tiny_inputs

    hf, tok = build_tiny("llama", attn_implementation="sdpa")
    inputs = dict(build_tiny_inputs("llama", tok, n=4))
    return f"tiny Llama 2x32, seq {inputs['input_ids'].shape[1]}, batch 4", Model.from_hf(hf, tok), inputs


def big_llama_case(layers: int, hidden: int, seq: int, batch: int) -> tuple[str, Model, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from haltrace.models.tiny import build_tiny

    tok = build_tiny("llama")[1]  # any tokenizer: inputs are ids, but the TL bridge insists on one
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, max_position_embeddings=seq)
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return (f"random Llama {layers}x{hidden}, seq {seq}, batch {batch}", Model.from_hf(hf, tok, name="llama"),
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


# --- timing --------------------------------------------------------------------------------------------------

def shared_copy(model: Model) -> Model:
    """A Model over a new module tree that shares ``model``'s weights (nnsight patches the tree it wraps)."""
    hf = model.hf
    memo = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    return Model(copy.deepcopy(hf, memo), model.processor, model.tokenizer, name_or_path=model.name_or_path)


def raw_hooks(model: Model, inputs: dict[str, Any]) -> Any:
    kept: list[Any] = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: kept.append(out)) for layer in model.adapter.layers]
    try:
        with torch.no_grad():
            return model.hf(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def methods(model: Model, inputs: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    hooks = [f"resid_post.{i}" for i in range(model.n_layers)]
    wrapped = shared_copy(model)

    def bare(m: Model = model) -> Any:
        with torch.no_grad():
            return m.hf(**inputs)

    return {
        "bare forward": bare,
        "hooks": lambda: capture_with(model, inputs, hooks, backend="hooks"),
        "transformer_lens": lambda: capture_with(model, inputs, hooks, backend="transformer_lens"),
        "nnsight": lambda: capture_with(wrapped, inputs, hooks, backend="nnsight"),
        "nnsight-wrapped, no trace": lambda: bare(wrapped),
        "raw hooks (diagnostic)": lambda: raw_hooks(model, inputs),
    }


def time_case(model: Model, inputs: dict[str, Any], reps: int, warmup: int, min_seconds: float = 0.0,
              target_s: float = 0.05, max_reps: int = 400) -> dict[str, dict[str, float]]:
    """Median times and paired ratios to the bare forward. A sample runs a method ``inner`` times in a row
    (enough calls for ~``target_s``), so millisecond forwards are not drowned in timer noise; short samples
    keep the two halves of a pair close in time. At least ``reps`` rounds, and more (up to ``max_reps``)
    until ``min_seconds`` have passed: on a shared machine a fast model's ratio needs many pairs for a
    stable median, a slow model's rounds are long enough as they are."""
    fns = methods(model, inputs)
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    start = time.perf_counter()
    fns["bare forward"]()
    inner = max(1, round(target_s / max(time.perf_counter() - start, 1e-6)))
    def run(name: str) -> float:
        fn = fns[name]
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner

    times, rounds = paired_rounds(run, names, reps, min_seconds, max_reps)
    out = {}
    for name, ratios in paired_ratios(times, "bare forward").items():
        ratio, q1, q3 = median_and_quartiles(ratios)
        out[name] = {"median_ms": 1000 * statistics.median(times[name]), "ratio": ratio,
                     "q1": q1, "q3": q3, "inner": inner, "reps": rounds}
    return out


# --- harvest memory ------------------------------------------------------------------------------------------

def harvest_memory(n: int) -> str:
    """Run bench_harvest_memory.py (another bench's) and return its printed table and summary."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_harvest_memory.py"), "--n", str(n)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if res.returncode != 0:
        return f"bench_harvest_memory.py failed (exit {res.returncode}):\n\n```\n{res.stderr[-2000:]}\n```\n"
    return res.stdout.strip() + "\n"


# --- report --------------------------------------------------------------------------------------------------

def render(cases: list[tuple[str, dict[str, dict[str, float]]]], harvest: str | None, args: argparse.Namespace) -> str:
    lines = [HEADING, "",
             f"`bench/bench_trace.py`, {time.strftime('%Y-%m-%d')}. CPU only, torch {torch.__version__}, "
             f"{args.threads} torch thread(s), on a machine with {os.cpu_count()} CPU cores **shared with other "
             f"jobs** (a training run, other engineers' tests), so absolute times are noisy; ratios are paired "
             f"per repetition (capture / bare forward of the same repetition), median over `reps` repetitions "
             f"(at least {args.reps}, more until the model has been timed {args.min_seconds:.0f} s) in rotating "
             f"order after {args.warmup} warm-up round(s); [q1-q3] in brackets; one repetition of a method = "
             f"`calls` back-to-back calls (~0.05 s), averaged. "
             f"Capture = every layer's `resid_post`, all positions, float32. Python {platform.python_version()}.",
             "", "| model | method | calls | reps | median time (ms) | x bare forward [q1-q3] |",
             "|---|---|---:|---:|---:|---:|"]
    for label, res in cases:
        for method, r in res.items():
            lines.append(f"| {label} | {method} | {r['inner']} | {r['reps']} | {r['median_ms']:.2f} | "
                         f"{r['ratio']:.3f} [{r['q1']:.2f}-{r['q3']:.2f}] |")
    lines.append("")
    for label, res in cases:
        ratio = res["hooks"]["ratio"]
        verdict = "meets goal" if ratio <= GOAL else ("within the hard limit" if ratio <= HARD_GOAL else "MISSES")
        lines.append(f"- {label}: hooks capture {ratio:.3f}x bare ({verdict}: goal <= {GOAL}x, limit <= "
                     f"{HARD_GOAL}x)")
    if harvest is not None:
        lines += ["", "### Harvest peak RSS, 1x vs 10x data set (`bench/bench_harvest_memory.py`)", "", harvest]
    return "\n".join(lines).rstrip() + "\n"


def write_section(section: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## Trace capture`` section of RESULTS.md; temp file + rename, so atomic."""
    paired.write_section(section, HEADING, path)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="minimum rounds per model")
    parser.add_argument("--min-seconds", type=float, default=40.0,
                        help="keep adding rounds (up to 400) until a model has been timed this long")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--harvest-n", type=int, default=64, help="examples at 1x for the harvest memory bench")
    parser.add_argument("--no-harvest", action="store_true")
    parser.add_argument("--quick", action="store_true", help="few reps, small big-model, print only")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup, args.no_harvest, args.min_seconds = 3, 1, True, 0.0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    builders = [lambda: organism_case(8), tiny_llama_case,
                lambda: big_llama_case(8, 512, 64 if args.quick else 256, 4)]
    cases = []
    for build in builders:
        label, model, inputs = build()
        print(f"timing {label} ...", file=sys.stderr, flush=True)
        cases.append((label, time_case(model, inputs, args.reps, args.warmup, args.min_seconds)))
    harvest = None if args.no_harvest else harvest_memory(args.harvest_n)
    section = render(cases, harvest, args)
    print(section)
    if not args.quick:
        write_section(section)
        print(f"wrote {RESULTS.relative_to(REPO)} ({HEADING})", file=sys.stderr)


if __name__ == "__main__":
    main()
