"""Paired timing shared by the benchmarks: every condition once per round, in a rotating order, and ratios to a
baseline taken within the same round (so machine load that changes between rounds cancels out).

>>> times, rounds = paired_rounds(lambda name: 0.01, ["bare", "hooked"], reps=3)
>>> rounds, [round(r, 3) for r in paired_ratios(times, "bare")["hooked"]]
(3, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def paired_rounds(run: Callable[[str], float], names: Sequence[str], reps: int, min_seconds: float = 0.0,
                  max_reps: int = 200) -> tuple[dict[str, list[float]], int]:
    """``({name: [seconds per round]}, rounds)``: at least ``reps`` rounds, and more (up to ``max_reps``) until
    ``min_seconds`` have passed. ``run(name)`` times one sample of a condition. The order rotates each round,
    so no condition always runs first."""
    names = list(names)
    times: dict[str, list[float]] = {n: [] for n in names}
    began = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - began < min_seconds and rounds < max_reps):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run(name))
        rounds += 1
    return times, rounds


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, list[float]]:
    """Per-round ratio of every condition to ``baseline`` (the baseline's own row is all ones)."""
    return {n: [t / b for t, b in zip(ts, times[baseline], strict=True)] for n, ts in times.items()}


def median_and_quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, q1, q3)``."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return statistics.median(values), q1, q3


def write_section(text: str, heading: str, path: Path) -> None:
    """Replace (or append) one bench's own section (starting at ``heading``) of RESULTS.md, keeping the others;
    temp file + rename, so a killed run never leaves the file half-written."""
    current = path.read_text() if path.exists() else "# haltrace benchmarks\n"
    start = current.find(heading + "\n")
    if start < 0:
        new = current.rstrip() + "\n\n" + text
    else:
        nxt = current.find("\n## ", start + len(heading))
        new = current[:start] + text + (current[nxt:] if nxt >= 0 else "")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
