"""Peak memory of ``haltrace.harvest`` at 1x and 10x data set size, against an in-memory cache.

Each measurement runs in a fresh child process and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(peak resident set size) plus the RSS right before harvesting starts (torch, the model and the data set
loaded), so "over base" is what harvesting itself added. ``in-memory`` keeps every batch's activations in a
Python list, which is what TransformerLens / nnsight style caching amounts to; it grows with the data set,
harvest should not (goal: peak RSS at 10x within 1.2x of 1x).

Model: a random ``LlamaForCausalLM`` (default 4 layers x 256 wide, so it runs on 2 shared CPU cores; the
brief's 8 x 512 is ``--layers 8 --hidden 512``), prompts of 48-64 tokens, every ``resid_post`` hook,
``positions="all"`` (the biggest, ragged case), batch 32, shards of 32 examples.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_harvest_memory.py            # 64 and 640 examples
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_harvest_memory.py --n 128 --layers 8 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BenchLlama:
    """Minimal stand-in for ``haltrace.models.Model`` around a random Llama: word-hash tokenizer, left padding,
    real forward hooks on the decoder blocks (``resid_post.i``). Keeps the bench independent of tokenizers."""

    def __init__(self, layers: int, hidden: int, vocab: int = 1024, seed: int = 0):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                          max_position_embeddings=256)
        self.hf = LlamaForCausalLM(cfg).eval()
        self.name_or_path, self.revision = f"random-llama-{layers}x{hidden}", None
        self.n_layers, self.hidden_size, self.vocab = layers, hidden, vocab
        self.device, self.dtype, self.is_vlm = torch.device("cpu"), torch.float32, False

    def valid_hooks(self) -> list[str]:
        return [f"resid_post.{i}" for i in range(self.n_layers)]

    def prepare(self, prompts: list[str], images: Any = None) -> dict[str, Any]:
        import torch

        ids = [[1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in p.split()] for p in prompts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in ids]),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])}

    def capture(self, inputs: Mapping[str, Any], hooks: Sequence[str], positions: Any = None) -> dict[str, Any]:
        import torch

        got: dict[str, Any] = {}
        handles = [self.hf.model.layers[int(h.split(".")[1])].register_forward_hook(
            lambda _m, _a, out, h=h: got.__setitem__(h, (out[0] if isinstance(out, tuple) else out).detach()))
            for h in hooks]
        try:
            mask = inputs["attention_mask"]
            with torch.no_grad():
                self.hf(input_ids=inputs["input_ids"], attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        finally:
            for handle in handles:
                handle.remove()
        if positions in (None, "all"):
            return got
        return {k: v[:, [-1]] for k, v in got.items()}


def make_dataset(n: int, seed: int = 0) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(48, 64))), "label": i % 2}
            for i in range(n)]


def child(mode: str, n: int, layers: int, hidden: int) -> dict[str, Any]:
    """Run one measurement in this (fresh) process; returns the numbers as a dict."""
    import torch

    sys.path.insert(0, str(REPO))
    from haltrace.trace.harvest import harvest

    torch.set_num_threads(2)
    model = BenchLlama(layers, hidden)
    data = make_dataset(n)
    hooks = model.valid_hooks()
    model.capture(model.prepare([data[0]["prompt"]]), hooks)  # warm up allocator / lazy init outside the timing
    base = _rss_mb()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "harvest":
            store = harvest(model, data, hooks, positions="all", out=tmp, batch_size=32, shard_size=32,
                            progress=False)
            act_bytes = sum(p.stat().st_size for p in store.shard_paths)
        else:  # what an in-memory activation cache does: keep every batch
            kept = []
            for lo in range(0, n, 32):
                inputs = model.prepare([d["prompt"] for d in data[lo:lo + 32]])
                cap = model.capture(inputs, hooks)
                mask = inputs["attention_mask"].bool()
                kept.append({h: cap[h][mask].clone() for h in hooks})
            act_bytes = sum(t.numel() * t.element_size() for b in kept for t in b.values())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"mode": mode, "n": n, "act_mb": act_bytes / 2**20, "base_mb": base, "peak_mb": peak,
            "over_base_mb": peak - base, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="examples at 1x (10x is 10 times this)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--modes", default="harvest,in-memory")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.layers, args.hidden)))
        return

    rows = []
    for mode in args.modes.split(","):
        for n in (args.n, 10 * args.n):
            cmd = [sys.executable, __file__, "--child", mode, str(n), "--layers", str(args.layers),
                   "--hidden", str(args.hidden)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.exit(f"child {mode} n={n} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"done {mode} n={n}", file=sys.stderr)

    print(f"\nharvest peak memory, random Llama {args.layers}x{args.hidden}, seq 48-64, "
          f"{args.layers} resid_post hooks, positions='all', float32, batch 32, shard 32 examples\n")
    print("| mode | examples | activations (MiB) | RSS before (MiB) | peak RSS (MiB) | peak - before (MiB) | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['n']} | {r['act_mb']:.1f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['over_base_mb']:.0f} | {r['seconds']:.1f} |")
    for mode in args.modes.split(","):
        small, big = [r for r in rows if r["mode"] == mode]
        verdict = "" if mode != "harvest" else f" (goal <= 1.2x: {'PASS' if big['peak_mb'] <= 1.2 * small['peak_mb'] else 'FAIL'})"
        print(f"\n{mode}: peak RSS 10x / 1x = {big['peak_mb'] / small['peak_mb']:.2f}x{verdict}; "
              f"harvesting's own share 10x / 1x = {big['over_base_mb']:.0f} / {small['over_base_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
