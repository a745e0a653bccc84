"""Start-up time of the command line: wall time of ``haltrace --help``, ``haltrace probe --help`` and
``haltrace steer --help``, against ``python -c pass`` on the same interpreter in the same run.

Each command is a fresh process (``subprocess.run``, output discarded) of the console script's entry point
(``python -c "from haltrace.cli import app; app()" ARGS``, which is what the installed ``haltrace`` script runs),
with this checkout first on ``PYTHONPATH``. Conditions run in a rotating order every round (bench/paired.py);
the table gives the median over rounds [q1-q3] and the median of the per-round difference to the baseline
(haltrace's own share: imports, building the app, rendering the help). Goal: every ``--help`` <= 0.3 s (median).
Byte-code caching is on (as for an installed package), whatever ``PYTHONDONTWRITEBYTECODE`` says here.

``--before DIR`` adds the same rows for another source tree, e.g. an earlier commit
(``mkdir /tmp/before && git archive COMMIT haltrace | tar -x -C /tmp/before``), to compare; ``--before-label``
says what it is in RESULTS.md.

Usage::

    .venv/bin/python bench/bench_cli.py                      # 5 rounds, writes its section of RESULTS.md
    .venv/bin/python bench/bench_cli.py --before /tmp/before  # with the rows of another tree
    .venv/bin/python bench/bench_cli.py --reps 2 --no-write   # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## CLI start-up"
GOAL_S = 0.3
ENTRY = "from haltrace.cli import app; app()"
COMMANDS: dict[str, list[str]] = {
    "haltrace --help": ["--help"],
    "haltrace probe --help": ["probe", "--help"],
    "haltrace steer --help": ["steer", "--help"],
}
BASELINE = "python -c pass"

from bench import paired  # noqa: E402
from bench.paired import median_and_quartiles, paired_rounds  # noqa: E402


def _plain_env() -> dict[str, str]:
    """This environment, less PYTHONDONTWRITEBYTECODE: an installed haltrace has its .pyc files (pip compiles them),
    so the first (warm-up) run writes them here as Python normally does, and the timed runs read them."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _env(tree: Path) -> dict[str, str]:
    env = dict(_plain_env(), COLUMNS="100", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def conditions(before: Path | None) -> dict[str, tuple[list[str], dict[str, str], Path]]:
    """``{name: (argv, env, cwd)}``: the baseline, then every command for this checkout (and for ``before``). Each
    runs in its own tree (``python -c`` puts the working folder first on ``sys.path``)."""
    out = {BASELINE: ([sys.executable, "-c", "pass"], _plain_env(), REPO)}
    trees = [("", REPO)] + ([(" (before)", before)] if before is not None else [])
    for suffix, tree in trees:
        for name, args in COMMANDS.items():
            out[name + suffix] = ([sys.executable, "-c", ENTRY, *args], _env(tree), tree)
    return out


def check(argv: list[str], env: dict[str, str], cwd: Path, tree: str) -> None:
    """Run once: it must succeed and print a usage line, and (``tree`` given) import haltrace from ``tree``."""
    res = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or (tree and "Usage:" not in res.stdout):
        raise SystemExit(f"{' '.join(argv[2:])} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    if tree:
        where = subprocess.run([sys.executable, "-c", "import haltrace; print(haltrace.__file__)"], env=env,
                               cwd=cwd, capture_output=True, text=True, timeout=60).stdout.strip()
        if not where.startswith(tree):
            raise SystemExit(f"haltrace imported from {where}, not from {tree}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(before: Path | None, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """``(wall seconds, CPU seconds, rounds)`` per condition. CPU time (user + system of the child) is a
    diagnostic that other jobs on a shared machine disturb much less than wall time."""
    conds = conditions(before)
    for name, (argv, env, cwd) in conds.items():
        check(argv, env, cwd, "" if name == BASELINE else str(cwd))
    cpu: dict[str, list[float]] = {name: [] for name in conds}

    def run(name: str) -> float:
        argv, env, cwd = conds[name]
        c0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       timeout=120)
        wall = time.perf_counter() - t0
        cpu[name].append(_children_cpu() - c0)
        return wall

    for name in conds:  # one warm-up each: the first run after an edit also writes .pyc files
        run(name)
        cpu[name].clear()
    times, rounds = paired_rounds(run, list(conds), reps)
    return times, cpu, rounds


def section(times: dict[str, list[float]], cpu: dict[str, list[float]], rounds: int, args: argparse.Namespace) -> str:
    import typer

    base = times[BASELINE]
    flags = f"--reps {args.reps}" + (" --before DIR" if args.before else "")
    lines = [HEADING, "",
             f"`bench/bench_cli.py` (`{flags}`), {time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
             f"typer {typer.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared "
             "with other jobs. Wall time of one fresh process per run (`python -c \"from haltrace.cli import app; "
             "app()\" ARGS`, what the installed `haltrace` script runs; output discarded), every condition once per "
             f"round in a rotating order, {rounds} rounds; median [q1-q3] over rounds, and the median of the "
             f"per-round difference to `{BASELINE}` (the interpreter's own start-up, same interpreter); .pyc "
             "caching on, as for an installed package, after one warm-up run of each. "
             f"Goal: every `--help` <= {GOAL_S} s (median). CPU = user + system time of the process (median), a "
             "diagnostic that other jobs on the machine disturb much less than wall time."
             + (f" Rows marked (before) are the same commands on the tree given with `--before`: {args.before_label}."
                if args.before else ""),
             "", "| command | median (s) [q1-q3] | minus baseline (s) | CPU (s) | goal |", "|---|---|---:|---:|---|"]
    for name, ts in times.items():
        med, q1, q3 = median_and_quartiles(ts)
        if name == BASELINE:
            lines.append(f"| `{name}` (baseline) | {med:.3f} [{q1:.3f}-{q3:.3f}] | - | "
                         f"{statistics.median(cpu[name]):.3f} | - |")
            continue
        own = statistics.median(t - b for t, b in zip(ts, base, strict=True))
        goal = f"<= {GOAL_S} s: {'met' if med <= GOAL_S else 'missed'}"
        lines.append(f"| `{name}` | {med:.3f} [{q1:.3f}-{q3:.3f}] | {own:.3f} | {statistics.median(cpu[name]):.3f} | "
                     f"{goal} |")
    lines += ["", "Rerun: `.venv/bin/python bench/bench_cli.py` (~1 min; `--before DIR` for the comparison rows). "
                  "`tests/unit/test_cli_imports.py` checks the cause (no torch or transformers imported for any "
                  "command's `--help`), not the time."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="rounds (median of this many runs per command; >= 2)")
    parser.add_argument("--before", type=Path, default=None,
                        help="another source tree to time the same commands on (e.g. `git archive HEAD`)")
    parser.add_argument("--before-label", default="another source tree",
                        help="what the --before tree is, for the RESULTS.md text")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.reps < 2:
        parser.error("--reps must be at least 2 (the table gives quartiles)")
    before = args.before.resolve() if args.before else None
    times, cpu, rounds = measure(before, args.reps)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.3f}s (CPU {statistics.median(cpu[name]):.3f}s)  "
              f"{[round(t, 3) for t in ts]}", flush=True)
    text = section(times, cpu, rounds, args)
    print(text)
    if not args.no_write:
        paired.write_section(text, HEADING, RESULTS)


if __name__ == "__main__":
    main()
