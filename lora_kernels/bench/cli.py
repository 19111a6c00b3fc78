"""The command line: ``python -m lora_kernels.bench``'s arguments, and the run
that prints the header, times every provider at each ``--tokens`` value and
prints the table (and writes the CSV and the plot). ``--overhead`` hands the
run to ``overhead.run_overhead``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch

from .cases import (DEFAULT_FEATURES, DEFAULT_PROVIDERS, DTYPES, LAYERS, MODE, PROVIDERS,
                    default_providers, kernel_name, parse_enable_lora)
from .heap import HEAPS, keep_freed_memory
from .measure import HELD_METHOD, default_timing, timing_note
from .overhead import PRESET, preset_options, run_overhead
from .profile import profile_lines
from .report import (append_csv, csv_rows, device_label, format_table, header, layer_notes,
                     plot, provider_notes)
from .sweep import progress_bar, sweep


def _providers_arg(values: Sequence[str]) -> List[str]:
    out = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m lora_kernels.bench",
        description="Time forward+backward of one LoRA layer for several providers "
                    f"({', '.join(PROVIDERS)}) and print a table. triton and cuda are the "
                    "lora_kernels layer with that backend forced for forward and backward "
                    "(skipped, with the reasons, where the backend cannot run). --overhead "
                    "times the host cost of a step at a small shape instead; --profile shows "
                    "where a lora_kernels step's time goes.",
        epilog=HELD_METHOD + ". Times: `y = layer(x); y.backward(g)` with grads set to None "
               "before each run; on cpu wall clock (time.perf_counter) with providers "
               "interleaved round robin (--repeat, --warmup); on cuda "
               "triton.testing.do_bench per provider (--warmup-ms, --rep-ms; median, p20, p80 "
               "from its quantiles), plus torch.cuda.max_memory_allocated peak memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layer", choices=LAYERS, default="linear")
    ap.add_argument("--in-features", type=int, default=None,
                    help="in features (embedding: num_embeddings; conv2d: in channels); "
                         "default per layer: " + ", ".join(f"{k} {v[0]}" for k, v in
                                                           DEFAULT_FEATURES.items()))
    ap.add_argument("--out-features", type=int, default=None,
                    help="out features (embedding: embedding_dim; conv2d: out channels); "
                         "default per layer: " + ", ".join(f"{k} {v[1]}" for k, v in
                                                           DEFAULT_FEATURES.items()))
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048],
                    help="rows of x (conv2d: batch*H*W with square HxW images of at most "
                         "--image-size); several values give several rows/points")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*rank)")
    ap.add_argument("--dropout", type=float, nargs="+", default=0.05,
                    help="lora_dropout (ignored for embedding, which loralib gives none); "
                         "several values only with --overhead, a table each")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--repeat", type=int, default=20,
                    help="cpu: timed repetitions (median, p20, p80 reported); unused on cuda")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed repetitions per provider (on cuda: before the peak-memory "
                         "step and do_bench's own warmup)")
    ap.add_argument("--warmup-ms", type=float, default=25.0,
                    help="cuda only: do_bench warmup time per provider, ms")
    ap.add_argument("--rep-ms", type=float, default=100.0,
                    help="cuda only: do_bench timed duration per provider, ms")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                    help=f"subset of {', '.join(PROVIDERS)} (space or comma separated). "
                         "Default per device: cpu: " + ", ".join(DEFAULT_PROVIDERS["cpu"])
                         + " (no triton: on cpu it needs TRITON_INTERPRET=1, the interpreter, "
                         "far too slow but for tiny shapes); cuda: "
                         + ", ".join(DEFAULT_PROVIDERS["cuda"]) + " (no lora_kernels: its "
                         "auto backend is cuda or else triton, listed already)")
    ap.add_argument("--enable-lora", default="1,0,1",
                    help="merged only: which output groups get LoRA")
    ap.add_argument("--kernel-size", type=int, default=3, help="conv2d only")
    ap.add_argument("--dora", action="store_true",
                    help="DoRA layers (linear only): lora_kernels.DoraLinear, PEFT use_dora=True, "
                         "reference.dora_linear; loralib has none")
    ap.add_argument("--image-size", type=int, default=32,
                    help="conv2d only: side of the square images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own choice; "
                         "on a machine shared with other work, 1 avoids OpenMP stalls)")
    ap.add_argument("--heap", choices=HEAPS, default="kept",
                    help="CPU: 'kept' (default) makes glibc keep freed memory for reuse, so "
                         "one provider's freed memory is not unmapped and faulted in again "
                         "inside another provider's timed step; 'default' leaves glibc's "
                         "adaptive trimming on")
    ap.add_argument("--csv", metavar="PATH", help="append rows (Liger-Kernel long format)")
    ap.add_argument("--plot", metavar="PNG", help="plot time vs tokens of this run's rows")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--overhead", action="store_true",
                    help="overhead mode: the host cost of a step (Python, dispatch, autograd, "
                         "allocation) at a small shape; per --dropout value a table of each "
                         "provider's median µs per step, its cost above the floor and that "
                         "cost as a ratio of loralib's. Preset (options given explicitly "
                         "win): " + preset_options())
    ap.add_argument("--profile", action="store_true",
                    help="after timing, run --profile-steps steps of the lora_kernels provider "
                         "at the first --tokens value (with --overhead: at each --dropout "
                         "value) under torch.profiler and print the top ops by self CPU time "
                         "and the total per step")
    ap.add_argument("--profile-steps", type=int, default=200,
                    help="steps run under the profiler with --profile (after --warmup)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.overhead:  # parsed again over the preset, so that explicit options win
        ap.set_defaults(**PRESET)
        args = ap.parse_args(argv)
    if not isinstance(args.dropout, list):  # the default, a single value
        args.dropout = [args.dropout]
    if len(args.dropout) > 1 and not args.overhead:
        ap.error(f"--dropout: got {args.dropout}, expected one value (several only with "
                 "--overhead)")
    if args.overhead:  # several values: all checked before the first table
        for d in args.dropout:
            if not 0.0 <= d < 1.0:
                ap.error(f"--dropout: got {d!r}, expected floats in [0, 1)")
    if args.overhead and args.plot:
        ap.error(f"--plot: got {args.plot!r}, expected none with --overhead (the plot is time "
                 "against tokens; --overhead prints tables)")
    providers = (list(default_providers(args.device)) if args.providers is None
                 else _providers_arg(args.providers))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        ap.error(f"--providers: got {bad or providers}, expected names among "
                 f"{', '.join(PROVIDERS)}")
    for name in ("repeat", "rank", "kernel_size", "image_size", "profile_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected >= 1")
    for name in ("warmup_ms", "rep_ms"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected > 0")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads: got {args.threads}, expected >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup: got {args.warmup}, expected >= 0")
    if any(t < 1 for t in args.tokens):
        ap.error(f"--tokens: got {args.tokens}, expected positive integers")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device: got cuda, but torch.cuda.is_available() is False")
    d_in, d_out = DEFAULT_FEATURES[args.layer]
    in_f = args.in_features or d_in
    out_f = args.out_features or d_out
    alpha = 2 * args.rank if args.alpha is None else args.alpha
    p = 0.0 if args.layer == "embedding" else args.dropout[0]
    try:
        enable = parse_enable_lora(args.enable_lora)
        kernel = kernel_name(args.layer, in_f, out_f, args.rank, p, args.dtype, enable,
                             args.kernel_size, args.dora)
    except ValueError as e:
        ap.error(str(e))
    if args.dora and args.layer != "linear":
        ap.error(f"--dora: given with --layer {args.layer}, expected --layer linear")
    device = torch.device(args.device)
    # make_providers' keywords other than tokens, dropout and providers.
    setup = dict(layer=args.layer, in_features=in_f, out_features=out_f, rank=args.rank,
                 alpha=alpha, dtype=args.dtype, device=device, enable_lora=enable,
                 kernel_size=args.kernel_size, image_size=args.image_size, seed=args.seed,
                 dora=args.dora)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.overhead:
            return run_overhead(args, argv, providers, setup, ap)
        return _run(args, argv, providers, setup, p, kernel, ap)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, providers, setup, p, kernel, ap) -> int:
    device = setup["device"]
    cuda = device.type == "cuda"
    timing = default_timing(device)
    heap = keep_freed_memory() if args.heap == "kept" and not cuda else None
    print(header(f"{kernel} (mode {MODE}: forward + backward)", device, argv, heap))
    print()

    bar = progress_bar(len(args.tokens) * (args.warmup + args.repeat) * len(providers),
                       args.no_progress)
    try:
        run = sweep(args, setup, p, providers, timing, bar, ap)
    finally:
        bar.close()
    results, versions = run.results, run.versions

    floor = {r.tokens: r.median for r in results if r.provider == "floor"}
    print(format_table(results, floor, cuda))
    print()
    print(timing_note(timing, args.repeat, args.warmup, args.warmup_ms, args.rep_ms))
    print(HELD_METHOD + (". peak MB: torch.cuda.max_memory_allocated during one step, less "
                         "what was allocated before it" if cuda else ""))
    for line in (layer_notes(args.layer, args.tokens[0], args.image_size, args.kernel_size,
                             args.dropout)
                 + provider_notes(providers, run.notes)):
        print(line)

    rows = csv_rows(kernel, results, versions, device)
    if args.csv:
        append_csv(args.csv, rows)
        print(f"csv: appended {len(rows)} rows to {args.csv}")
    if args.plot:
        plot(args.plot, rows, f"{kernel}, {MODE} (fwd+bwd), {device_label(device)}")
        print(f"plot: {args.plot}")
    if args.profile:
        print()
        print("\n".join(profile_lines(setup, args.tokens[0], p, args.profile_steps,
                                      args.warmup)))
    return 0
