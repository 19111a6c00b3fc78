"""``python -m lora_kernels.bench``: time one LoRA layer's forward+backward, provider by provider.

Providers (each skipped with a note when its package is missing or it has no
such layer):

``floor``
    The frozen work every LoRA layer must do anyway: ``nn.Linear`` /
    ``nn.Embedding`` / ``nn.Conv2d`` with frozen weights, forward plus the
    backward to the input (an embedding has no input gradient: forward only).
``reference``
    ``lora_kernels.reference`` (plain PyTorch, torch autograd): the unfused
    reference.
``lora_kernels``
    This package's layer, on whatever backend ``auto`` picks (the header says which).
``triton``, ``cuda``
    This package's layer with that backend forced (``lora_kernels.use_backend``)
    for the forward and the backward; skipped with the backend's reasons where
    it cannot run (triton: a CUDA device, or CPU only under ``TRITON_INTERPRET=1``,
    the interpreter, far too slow for anything but tiny shapes; cuda: the CUDA
    C++ kernels, not built yet).
``loralib``
    loralib's layer of the same name.
``peft``
    PEFT's LoRA layer wrapped around the same base layer (no MergedLinear).

Default providers depend on the device (``DEFAULT_PROVIDERS``): on CPU
floor, reference, lora_kernels, loralib, peft (no triton: the interpreter is
far too slow); on CUDA floor, reference, triton, cuda, loralib, peft (there
``lora_kernels`` is ``auto``, which is cuda or else triton, so it would
duplicate one of them).

Every provider gets the same W, bias, A and B (B non-zero, so the low-rank
branch is really computed), the same input values and the same upstream
gradient; frozen W and bias, trainable LoRA parameters, train mode. One
repetition times ``y = layer(x); y.backward(g)`` with the gradients set to
None beforehand. On CPU, providers take turns within each repetition (round
robin, the starting provider rotating) so machine noise falls on all of them
alike, timed with ``time.perf_counter``. On CUDA each provider is timed in turn
by ``triton.testing.do_bench`` (CUDA events, L2 cache cleared before each run;
the timed callable sets the grads to None and then runs the step), which
reports the median, p20 and p80.

On CPU the benchmark first makes glibc keep freed memory for reuse
(``--heap kept``, the default; ``keep_freed_memory``): with glibc's adaptive
defaults a large block freed by one provider is returned to the OS inside
whichever provider's step frees the last block above it, and faulted in again
by the next large allocation, which made the medians of interleaved runs
bimodal. The header's ``heap:`` line says what was set; ``--heap default``
leaves the allocator alone.

Bytes held for backward
-----------------------
Measured, not computed: during one extra forward, outside the timed
repetitions, ``torch.autograd.graph.saved_tensors_hooks`` records every tensor
autograd saves for backward: ``save_for_backward`` in torch's own ops, in
``autograd.Function`` and in ``torch.library`` custom ops (the ``lora_kernels``
ops save through it). The figure is the total size of the distinct storages
among them, leaving out the layer's parameters and buffers, the input and the
output (memory the caller holds anyway). A tensor kept on ``ctx`` as a plain
attribute is not seen; none of the providers here does that.

Overhead mode
-------------
``python -m lora_kernels.bench --overhead`` measures the host cost of a step:
at small shapes a step is mostly machinery (Python, operator dispatch,
autograd, allocation) rather than arithmetic. Its preset: a linear layer
64 -> 64, 16 tokens, rank 8, one thread, providers floor, lora_kernels,
loralib, peft, dropout 0.05 and 0, 400 repetitions after 50 warmup steps,
timed as above (round robin on CPU). Options given on the command line
override the preset; ``--dropout`` takes several values in this mode. For each
dropout value a table gives, per provider, the median, p20 and p80 µs per
step, the µs above the floor (median − floor's median: what the LoRA branch
and its machinery add) and that cost as a ratio of loralib's (``x loralib``).

Profile
-------
``--profile`` (in either mode) then runs ``--profile-steps`` steps (200) of
the lora_kernels provider, built as for the timing, at the first ``--tokens``
value (with ``--overhead``: at each dropout value) under ``torch.profiler``
with CPU activities, and prints the top 20 ops by self CPU time and the total
per step. Where the profiler cannot run, one line says why.

The setup is shared with ``benchmarks/test_bench_layers.py`` (pytest-benchmark):
``make_providers`` builds the cases, ``Case.step`` is what gets timed.

The package, one file per job: ``cases`` (the providers: ``make_providers``,
``Case``), ``measure`` (``held_bytes``, ``run_cases``, ``Result``), ``heap``
(``--heap``), ``sweep`` (build and time the providers at each ``--tokens``
value), ``report`` (the header, the table, the notes, the CSV, the plot),
``overhead`` (``--overhead``), ``profile`` (``--profile``) and ``cli`` (the
arguments and the run; ``__main__`` calls it).
"""
from .cases import (BACKEND_PROVIDERS, DEFAULT_FEATURES, DEFAULT_PROVIDERS, DTYPES, LAYERS,
                    MODE, PROVIDERS, Case, conv_geometry, default_providers, forced_backend,
                    kernel_name, lora_kernels_backend, make_providers, parse_enable_lora)
from .cli import build_parser, main
from .heap import HEAPS, keep_freed_memory
from .measure import (HELD_METHOD, TIMINGS, Result, default_timing, held_bytes, run_cases,
                      timing_note)
from .report import (CSV_COLUMNS, MB, append_csv, csv_rows, device_label, format_table,
                     machine_line, plot)

__all__ = [
    "BACKEND_PROVIDERS", "CSV_COLUMNS", "Case", "DEFAULT_FEATURES", "DEFAULT_PROVIDERS", "DTYPES",
    "HEAPS", "HELD_METHOD", "LAYERS", "MB", "MODE", "PROVIDERS", "Result", "TIMINGS",
    "append_csv", "build_parser", "conv_geometry", "csv_rows", "default_providers",
    "default_timing", "device_label", "forced_backend", "format_table", "held_bytes",
    "keep_freed_memory", "kernel_name", "lora_kernels_backend", "machine_line", "main",
    "make_providers", "parse_enable_lora", "plot", "run_cases", "timing_note",
]
