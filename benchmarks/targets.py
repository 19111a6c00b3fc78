"""The project's CPU speed targets, checked against a benchmark CSV.

    python benchmarks/targets.py benchmarks/results/cpu-2core-amd/cpu.csv

reads the rows ``python -m lora_kernels.bench --csv`` appended (as
``benchmarks/cpu_series.sh`` runs it) and prints one line per target: the
figure measured, the bound, and ``ok``, ``MISSED`` or ``not run``. It exits
with 1 if a target was missed, 2 if one was not run, 0 otherwise.

Every figure is a ratio of medians measured in the same run (interleaved
providers), so it compares across machines; the times themselves do not.
A median over a noisy machine can miss by a few percent on one run and meet
the bound on the next: rerun the command of a missed row before concluding.

The targets (2-core machines, fp32; the README's benchmark tables):

* host cost per layer step (``--overhead``: Linear 64→64, 16 tokens, r=8, one
  thread), dropout 0.05 and 0: lora_kernels' time above the floor at most
  0.7× loralib's;
* small token counts (Linear 1024², r=16, dropout 0.05; 16, 64, 256 tokens):
  lora_kernels at or below loralib, as multiples of the floor;
* large shapes, as multiples of the floor: Linear 4096², 2048 tokens, r=16,
  dropout 0.05 and MergedLinear 1024→3072 [1,0,1], 4096 tokens, r=8 at most
  1.05×; Embedding 32000×1024, 4096 tokens, r=8 at most 3×; DoRA Linear
  4096², 2048 tokens, r=16, dropout 0.05 at most 2.1×.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

OVERHEAD = "lora_linear_in64_out64_r8_p{p}_float32"
SMALL = "lora_linear_in1024_out1024_r16_p0.05_float32"


@dataclass(frozen=True)
class Target:
    """``figure(provider) ≤ bound`` for one kernel at one token count.

    kind "floor": median(provider) / median(floor);
    kind "vs_loralib": the same ratio, bound by loralib's own;
    kind "above_floor": (median(provider) − floor) / (median(loralib) − floor).
    """
    name: str
    kernel: str
    tokens: int
    kind: str
    bound: Optional[float] = None
    provider: str = "lora_kernels"


TARGETS: Tuple[Target, ...] = (
    *(Target(f"host cost above the floor, dropout {p}, ÷ loralib's", OVERHEAD.format(p=p), 16,
             "above_floor", 0.7) for p in ("0.05", "0")),
    *(Target(f"Linear 1024², {t} tokens, dropout 0.05, × floor", SMALL, t, "vs_loralib")
      for t in (16, 64, 256)),
    Target("Linear 4096², 2048 tokens, dropout 0.05, × floor",
           "lora_linear_in4096_out4096_r16_p0.05_float32", 2048, "floor", 1.05),
    Target("MergedLinear 1024→3072 [1,0,1], 4096 tokens, × floor",
           "lora_merged_in1024_out3072_e101_r8_p0.05_float32", 4096, "floor", 1.05),
    Target("Embedding 32000×1024, 4096 tokens, × floor",
           "lora_embedding_in32000_out1024_r8_p0_float32", 4096, "floor", 3.0),
    Target("DoRA Linear 4096², 2048 tokens, dropout 0.05, × floor",
           "lora_linear_in4096_out4096_dora_r16_p0.05_float32", 2048, "floor", 2.1),
)

Medians = Dict[Tuple[str, int, str], float]


def read_medians(rows: Iterable[dict]) -> Medians:
    """(kernel, tokens, provider) → median time of the speed rows; the last
    row wins where a CSV holds a case twice (a rerun appends)."""
    out: Medians = {}
    for r in rows:
        if r.get("metric") == "speed":
            out[(r["kernel"], int(r["x"]), r["provider"])] = float(r["median"])
    return out


@dataclass
class Check:
    target: Target
    figure: Optional[float]
    bound: Optional[float]

    @property
    def status(self) -> str:
        if self.figure is None or self.bound is None:
            return "not run"
        return "ok" if self.figure <= self.bound else "MISSED"


def check(target: Target, medians: Medians) -> Check:
    def get(provider):
        return medians.get((target.kernel, target.tokens, provider))

    mine, floor, loralib = get(target.provider), get("floor"), get("loralib")
    if mine is None or floor is None or not floor > 0:
        return Check(target, None, target.bound)
    if target.kind == "floor":
        return Check(target, mine / floor, target.bound)
    if loralib is None:
        return Check(target, None, None)
    if target.kind == "vs_loralib":
        return Check(target, mine / floor, loralib / floor)
    if target.kind == "above_floor":
        above = loralib - floor
        return Check(target, (mine - floor) / above if above > 0 else None, target.bound)
    raise ValueError(f"target {target.name!r}: kind {target.kind!r}, expected one of "
                     "'floor', 'vs_loralib', 'above_floor'")


def format_checks(checks: List[Check]) -> str:
    def num(v):
        return "—" if v is None else f"{v:.3f}"

    width = max(len(c.target.name) for c in checks)
    lines = [f"{'target':<{width}}  figure   bound  status",
             f"{'-' * width}  ------  ------  -------"]
    for c in checks:
        mark = "*" if c.target.kind == "vs_loralib" else " "
        lines.append(f"{c.target.name:<{width}}  {num(c.figure):>6}  {num(c.bound):>6}{mark} "
                     f"{c.status}")
    lines.append("* bound: loralib's figure in the same run")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="a CSV written by `python -m lora_kernels.bench --csv`")
    args = ap.parse_args(argv)
    try:
        with open(args.csv, newline="") as f:
            medians = read_medians(csv.DictReader(f))
    except OSError as e:
        ap.error(f"csv: cannot read {args.csv!r} ({e.strerror})")
    checks = [check(t, medians) for t in TARGETS]
    print(format_checks(checks))
    statuses = {c.status for c in checks}
    return 1 if "MISSED" in statuses else 2 if "not run" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
