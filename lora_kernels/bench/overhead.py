"""``--overhead``: the host cost of one LoRA layer step.

A step is arithmetic plus machinery (Python, operator dispatch, autograd,
allocation); at small shapes the machinery is most of it. The preset
(``PRESET``: a 64x64 linear layer on 16 tokens, rank 8, one thread, 400 timed
repetitions) times the providers round robin as the table mode does, once per
``--dropout`` value, and prints for each provider the median µs per step, the
µs above the floor's median (what the LoRA branch and its machinery add) and
that cost as a ratio of loralib's.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from .cases import MODE, kernel_name
from .heap import keep_freed_memory
from .measure import Result, default_timing, timing_note
from .profile import profile_lines
from .report import aligned, append_csv, csv_rows, header, layer_notes, provider_notes
from .sweep import progress_bar, sweep

# What --overhead sets, by argparse dest; options given on the command line win.
PRESET = dict(layer="linear", in_features=64, out_features=64, tokens=[16], rank=8,
              threads=1, providers=["floor", "lora_kernels", "loralib", "peft"],
              dropout=[0.05, 0.0], repeat=400, warmup=50)
TABLE_HEAD = ["tokens", "provider", "median µs", "p20 µs", "p80 µs", "above floor µs",
              "x loralib"]
COLUMNS_NOTE = ("above floor µs = median - floor's median at the same tokens; x loralib = "
                "above floor / loralib's above floor")


def preset_options() -> str:
    """``PRESET`` as command-line options."""
    out = []
    for dest, value in PRESET.items():
        values = value if isinstance(value, list) else [value]
        out.append(f"--{dest.replace('_', '-')} "
                   + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values))
    return " ".join(out)


def format_overhead_table(results: List[Result]) -> str:
    """One row per result: times in µs, the cost above the floor and its ratio
    to loralib's ("-" where the floor or loralib did not run)."""
    floor = {r.tokens: r.median for r in results if r.provider == "floor"}
    loralib = {r.tokens: r.median - floor[r.tokens] for r in results
               if r.provider == "loralib" and r.tokens in floor}
    rows = []
    for r in results:
        f, ref = floor.get(r.tokens), loralib.get(r.tokens)
        above = None if f is None else r.median - f
        rows.append([str(r.tokens), r.provider, f"{r.median * 1e3:.1f}", f"{r.p20 * 1e3:.1f}",
                     f"{r.p80 * 1e3:.1f}", "-" if above is None else f"{above * 1e3:.1f}",
                     "-" if above is None or not ref else f"{above / ref:.2f}"])
    return aligned(TABLE_HEAD, rows, [r.tokens for r in results])


def run_overhead(args, argv: Sequence[str], providers: Sequence[str], setup: dict,
                 ap) -> int:
    """Time ``providers`` at each ``args.dropout`` value and print a table per
    value (then the profile with ``args.profile``). ``setup``: the keywords of
    ``make_providers`` other than tokens, dropout and providers."""
    device = setup["device"]
    cuda = device.type == "cuda"
    timing = default_timing(device)
    # An embedding has no dropout: one table.
    ps = list(dict.fromkeys(0.0 if args.layer == "embedding" else d for d in args.dropout))
    kernels = {p: kernel_name(args.layer, setup["in_features"], setup["out_features"],
                              args.rank, p, args.dtype, setup["enable_lora"], args.kernel_size,
                              setup.get("dora", False))
               for p in ps}
    heap = keep_freed_memory() if args.heap == "kept" and not cuda else None
    print(header(f"overhead (host cost per step) of {', '.join(kernels.values())} "
                 f"(mode {MODE}: forward + backward)", device, argv, heap))

    bar = progress_bar(len(ps) * len(args.tokens) * (args.warmup + args.repeat)
                       * len(providers), args.no_progress)
    notes: Dict[str, str] = {}
    rows: List[dict] = []
    try:
        for p in ps:
            run = sweep(args, setup, p, providers, timing, bar, ap)
            for name, note in run.notes.items():
                notes.setdefault(name, note)
            rows += csv_rows(kernels[p], run.results, run.versions, device)
            print()
            print(f"dropout {p:g}: {kernels[p]}")
            print(format_overhead_table(run.results))
    finally:
        bar.close()
    print()
    print(timing_note(timing, args.repeat, args.warmup, args.warmup_ms, args.rep_ms,
                      x_floor=False))
    print(COLUMNS_NOTE)
    for line in (layer_notes(args.layer, args.tokens[0], args.image_size, args.kernel_size,
                             args.dropout)
                 + provider_notes(providers, notes)):
        print(line)
    if args.csv:
        append_csv(args.csv, rows)
        print(f"csv: appended {len(rows)} rows to {args.csv}")
    if args.profile:
        for p in ps:
            print()
            print("\n".join(profile_lines(setup, args.tokens[0], p, args.profile_steps,
                                          args.warmup)))
    return 0
