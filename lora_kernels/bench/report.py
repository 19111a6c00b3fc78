"""What a run prints and writes: the header, the table, the notes, the CSV
rows (Liger-Kernel long format) and the plot.
"""
from __future__ import annotations

import csv
import itertools
import os
import platform
import shlex
from typing import Dict, List, Optional, Sequence

import torch

from .. import __version__
from .cases import MODE, conv_geometry, lora_kernels_backend
from .measure import Result

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x", "median", "p20", "p80",
               "device", "version")

MB = 1024 * 1024


def machine_line(device) -> str:
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's lines: model name, then flags
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    # CPUs of one name differ in SIMD (an AMD EPYC may or may not have AVX-512).
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    if simd:
        cpu = f"{cpu} ({simd})"
    parts = [f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
             f"{platform.system()} {platform.machine()}", f"python {platform.python_version()}",
             f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"device cuda ({torch.cuda.get_device_name(device)})")
    else:
        parts.append(f"device {device.type}")
    return ", ".join(parts)


def header(title: str, device, argv: Sequence[str], heap: Optional[str]) -> str:
    """The lines a run starts with: what is timed, the machine, the version and
    backend, the command, and what ``--heap`` set (``heap``, None: nothing)."""
    return "\n".join([
        f"lora_kernels.bench: {title}",
        f"machine: {machine_line(device)}",
        f"lora_kernels {__version__}, backend: {lora_kernels_backend(device)}",
        f"command: python -m lora_kernels.bench {shlex.join(argv)}".rstrip(),
        f"heap: {heap or 'allocator defaults'}",
    ])


def device_label(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def format_table(results: List[Result], floor: Dict[int, float], cuda: bool) -> str:
    head = ["tokens", "provider", "median ms", "p20 ms", "p80 ms", "x floor", "held MB"]
    if cuda:
        head.append("peak MB")
    rows = []
    for r in results:
        f = floor.get(r.tokens)
        row = [str(r.tokens), r.provider, f"{r.median:.3f}", f"{r.p20:.3f}", f"{r.p80:.3f}",
               f"{r.median / f:.2f}" if f else "-", f"{r.held / MB:.3f}"]
        if cuda:
            row.append("-" if r.peak is None else f"{r.peak / MB:.3f}")
        rows.append(row)
    return aligned(head, rows, [r.tokens for r in results])


def aligned(head: List[str], rows: List[List[str]], groups: Sequence) -> str:
    """``rows`` under ``head``, the first two columns left-aligned and the
    others right-aligned; a blank line wherever ``groups`` (a key per row) changes."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    prev = None
    for group, row in zip(groups, rows):
        if prev is not None and group != prev:
            lines.append("")
        prev = group
        lines.append(fmt(row))
    return "\n".join(lines)


def layer_notes(layer: str, tokens: int, image_size: int, kernel_size: int,
                dropouts: Sequence[float]) -> List[str]:
    """What a conv2d run's tokens mean (shown for ``tokens``), and that an
    embedding ignores ``dropouts``."""
    out = []
    if layer == "conv2d":
        b, side = conv_geometry(tokens, image_size)
        out.append(f"conv2d: tokens = batch*H*W with square images (e.g. {tokens} -> "
                   f"{b} x {side}x{side}), padding {kernel_size // 2}")
    if layer == "embedding" and any(dropouts):
        out.append(f"embedding: --dropout {' '.join(map(str, dropouts))} ignored (loralib's "
                   "Embedding has no dropout)")
    return out


def provider_notes(providers: Sequence[str], notes: Dict[str, str]) -> List[str]:
    """One line per provider that has a note, in ``providers`` order."""
    return [f"  {name:<13} {notes[name]}" for name in providers if name in notes]


def csv_rows(kernel: str, results: List[Result], versions: Dict[str, str], device) -> List[dict]:
    dev = device_label(device)
    out = []
    for r in results:
        common = dict(kernel=kernel, provider=r.provider, mode=MODE, x=r.tokens, device=dev,
                      version=versions[r.provider])
        out.append(dict(common, metric="speed", unit="ms", median=round(r.median, 6),
                        p20=round(r.p20, 6), p80=round(r.p80, 6)))
        held = round(r.held / MB, 6)
        out.append(dict(common, metric="memory", unit="MB", median=held, p20=held, p80=held))
        if r.peak is not None:
            peak = round(r.peak / MB, 6)
            out.append(dict(common, metric="peak_memory", unit="MB", median=peak, p20=peak,
                            p80=peak))
    return [{k: row[k] for k in CSV_COLUMNS} for row in out]


def append_csv(path: str, rows: List[dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def plot(path: str, rows: List[dict], title: str) -> None:
    """Time (and held memory) vs tokens, one line per provider, log x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    # Distinct markers and dashes: providers with equal held bytes overlap exactly.
    styles = itertools.cycle([("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")])
    for prov, (marker, dash) in zip(providers, styles):
        for ax, metric in ((ax_t, "speed"), (ax_m, "memory")):
            pts = sorted((float(r["x"]), float(r["median"]), float(r["p20"]), float(r["p80"]))
                         for r in rows if r["provider"] == prov and r["metric"] == metric)
            if not pts:
                continue
            xs, med, lo, hi = zip(*pts)
            line, = ax.plot(xs, med, marker=marker, linestyle=dash, label=prov,
                            markerfacecolor="none")
            if metric == "speed":
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    xticks = sorted({float(r["x"]) for r in rows})
    ax_t.set_ylabel("forward + backward, ms (median; band p20-p80)")
    ax_m.set_ylabel("held for backward, MB")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
