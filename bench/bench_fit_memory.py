"""Peak memory of the fits at LLaVA-1.5-7B widths, on synthesised activations (no 7B forward needed).

Each row runs in a fresh child process: it imports torch and haltrace, records the RSS (``base``), synthesises
the activations the fit must hold with ``torch.randn`` at the real shapes, runs the fit's own code on them, and
reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set size). ``fit peak`` is peak - base,
which includes the activations themselves; the goal is ``fit peak <= 2 x activations``.

Shapes (LLaVA-1.5-7B): language model 32 blocks x 4096, CLIP ViT-L/14-336 24 blocks x 577 tokens x 1024.

* ``vti``: the visual differences ``[N demos, 24, 577, 1024]`` plus the textual ``[N, 32, 4096]``, then
  :func:`haltrace.steering.vti.mean_plus_pc1` as ``VTI.fit`` calls it (visual: one float32 PCA per
  (layer, token) row on the model's device -- here the CPU; textual: one PCA of ``[N, 32 x 4096]``).
  N = 50, the paper's demo count.
* ``truthprint``: ``resid_post`` states of every block at the answer position, ``[N questions, 4096]`` x 32,
  half of them "yes" answers and 70 % of those the training split (as in ``TruthPrInt.fit``), then
  :func:`haltrace.steering.truthprint.select_detector` on the largest candidate (all 32 blocks concatenated,
  131,072 features, the candidate that sets the peak; the full search fits 63 candidates x 2 Cs, which the
  5-minute budget does not allow on 2 cores). N = 1,000.
* ``probe-sweep``: :func:`haltrace.probes.fit_probes` on ``[32, N, 4096]`` (5 outer x 3 inner folds, the
  default Cs). N = 1,000.

Usage::

    .venv/bin/python bench/bench_fit_memory.py                 # every row, writes bench/RESULTS.md's section
    .venv/bin/python bench/bench_fit_memory.py --rows vti --no-write
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Fit memory at 7B widths"
LM_LAYERS, LM_WIDTH = 32, 4096
V_LAYERS, V_TOKENS, V_WIDTH = 24, 577, 1024
ROWS = {
    "vti": 50,
    "truthprint": 1000,
    "probe-sweep": 1000,
}


def child(row: str, n: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from bench.bench_harvest_memory import _rss_mb
    from haltrace.probes.linear import fit_probes
    from haltrace.steering.truthprint import select_detector
    from haltrace.steering.vti import mean_plus_pc1

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    mean_plus_pc1(torch.randn(3, 2, 4), row_dims=1)  # warm up lazy init outside the measurement
    base = _rss_mb()
    start = time.perf_counter()
    if row == "vti":
        shape = f"visual [{n}, {V_LAYERS}, {V_TOKENS}, {V_WIDTH}] + textual [{n}, {LM_LAYERS}, {LM_WIDTH}]"
        visual = torch.randn(n, V_LAYERS, V_TOKENS, V_WIDTH, generator=gen)
        text = torch.randn(n, LM_LAYERS, LM_WIDTH, generator=gen)
        act = visual.numel() * 4 + text.numel() * 4
        made = time.perf_counter()
        vis_dir = mean_plus_pc1(visual, row_dims=2, device="cpu")
        text_dir = mean_plus_pc1(text, device="cpu")
        check = f"dirs {tuple(vis_dir.shape)} {tuple(text_dir.shape)}"
    elif row == "truthprint":
        shape = f"{LM_LAYERS} x [{n}, {LM_WIDTH}], detector on all {LM_LAYERS} blocks ({LM_LAYERS * LM_WIDTH} features)"
        feats = {i: torch.randn(n, LM_WIDTH, generator=gen).numpy() for i in range(LM_LAYERS)}
        act = sum(f.nbytes for f in feats.values())
        rng = np.random.default_rng(0)
        says = rng.random(n) < 0.5
        held = rng.random(n) < 0.3
        y = (rng.random(n) < 0.4).astype(int)
        for i in range(LM_LAYERS):  # a weak label signal, so the fit is a fit
            feats[i][:, :8] += y[:, None] * 0.5
        made = time.perf_counter()
        pick, _, _ = select_detector(feats, y, says & ~held, says & held, [list(range(LM_LAYERS))], (0.1,))
        check = f"val AUROC {pick['val_auroc']:.3f}"
    elif row == "probe-sweep":
        shape = f"[{LM_LAYERS}, {n}, {LM_WIDTH}]"
        X = torch.randn(LM_LAYERS, n, LM_WIDTH, generator=gen)
        y = torch.arange(n) % 2
        X[:, :, :8] += y[None, :, None] * 0.5
        act = X.numel() * 4
        made = time.perf_counter()
        sweep = fit_probes(X, y)
        check = f"last-layer AUROC {float(sweep.auroc[-1]):.3f}"
    else:
        raise SystemExit(f"unknown row {row}")
    seconds = time.perf_counter() - made
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"row": row, "n": n, "shape": shape, "act_mb": act / 2**20, "base_mb": base, "peak_mb": peak,
            "fit_mb": peak - base, "ratio": (peak - base) / (act / 2**20), "fit_s": seconds,
            "synth_s": made - start, "check": check}


def table(rows: list[dict[str, Any]]) -> str:
    import torch

    lines = [
        SECTION, "",
        f"`bench/bench_fit_memory.py`, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, 2 CPU cores shared with other jobs. "
        "Synthetic float32 activations at LLaVA-1.5-7B shapes (LM 32 x 4096, CLIP-L 24 x 577 x 1024); one fresh "
        "process per row; *fit peak* = peak RSS (ru_maxrss) - RSS after imports, so it includes the activations "
        "themselves. Goal: fit peak <= 2x the activations.",
        "",
        "| fit | items | activations held | activations (MiB) | fit peak (MiB) | peak / activations | goal <= 2x "
        "| fit time (s) | check |",
        "|---|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['row']} | {r['n']} | {r['shape']} | {r['act_mb']:.0f} | {r['fit_mb']:.0f} | "
                     f"{r['ratio']:.2f}x | {'PASS' if r['ratio'] <= 2.0 else 'FAIL'} | {r['fit_s']:.1f} | "
                     f"{r['check']} |")
    lines += [
        "",
        "Notes: VTI's visual half is one float32 PCA per (layer, token) row (13,848 rows of [50, 1024]), by the "
        "[50, 50] Gram matrix of each row block (64 MiB blocks), on the model's device; the former float64 PCA "
        "of the whole flattened [50, 24 x 577 x 1024] difference needed a float64 copy plus its centred copy "
        "and SVD workspace (~4x the 2.7 GiB float32 differences in float64 terms, about 20 GB). TruthPrInt is "
        "measured on its largest detector candidate only (all 32 blocks, C = 0.1), which sets the peak; the "
        "full candidate search (63 block runs x 2 Cs) repeats the same allocation per candidate and takes too "
        "long for this bench on 2 cores. The probe sweep's extra memory is solver state that grows with items "
        "x the 128-dim reduced features, not with the width; three changes took it from 3.14x to under 2x: "
        "only the final fold's basis kept per layer (not all six), the per-fold features written into one "
        "preallocated tensor that the batched Newton solve reads without a copy (scores per layer), and Newton "
        "chunks of ~80 MB instead of ~160 MB (one (layer, fold) group at a time at 1,000 items; unchanged at the "
        "10,000-item probe bench, where one group is already over the chunk size). Fits not in the table (CAA, "
        "ITI, PvP, VHR, VISTA, DoLa, ProjectAway) were not measured here.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = REPO / "bench" / "RESULTS.md") -> None:
    """This bench's section of RESULTS.md (``SECTION``), the others kept."""
    sys.path.insert(0, str(REPO))
    from bench import paired

    paired.write_section(text, SECTION, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--n", type=int, default=None, help="items for every row (default: each row's own)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    rows = []
    for row in args.rows.split(","):
        n = args.n or ROWS[row]
        res = subprocess.run([sys.executable, __file__, "--child", row, str(n)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            sys.exit(f"child {row} n={n} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"done {row}: {rows[-1]}", file=sys.stderr)
    text = table(rows)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
