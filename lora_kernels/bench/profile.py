"""``--profile``: where one lora_kernels step's time goes. The lora_kernels
provider, built as the timed run builds it, runs its steps under
``torch.profiler`` (CPU activities); the ops come out sorted by self CPU time,
with the total per step.
"""
from __future__ import annotations

import gc
import time
import warnings
from typing import List

import torch

from .cases import make_providers

PROVIDER = "lora_kernels"
ROWS = 20  # rows of the profiler's table


def profile_lines(setup: dict, tokens: int, dropout: float, steps: int,
                  warmup: int) -> List[str]:
    """The profile of ``steps`` steps of the lora_kernels provider (after
    ``warmup`` untimed ones). ``setup``: the keywords of ``make_providers``
    other than tokens, dropout and providers. Where the profiler cannot run,
    one line that says why."""
    title = f"profile: {PROVIDER}, tokens {tokens}, dropout {dropout:g}"
    try:
        from torch.profiler import ProfilerActivity, profile
    except Exception as e:
        return [f"{title}: torch.profiler is not available ({type(e).__name__}: {e})"]
    case = make_providers(tokens=tokens, dropout=dropout, providers=[PROVIDER],
                          **setup)[PROVIDER]
    if case.skip is not None:
        return [f"{title}: skipped: {case.skip}"]
    cuda = setup["device"].type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(setup["device"])

    gc_was_enabled = gc.isenabled()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="lora_kernels: running the unfused")
            for _ in range(warmup):
                case.zero_grad()
                case.step()
            sync()
            gc.collect()
            gc.disable()  # as in the timed repetitions
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False,
                         with_stack=False) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    case.zero_grad()
                    case.step()
                sync()
                wall_s = time.perf_counter() - t0
        events = prof.key_averages()
        table = events.table(sort_by="self_cpu_time_total", row_limit=ROWS)
        self_us = sum(e.self_cpu_time_total for e in events)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return [f"{title}: the profiler failed ({type(e).__name__}: {first})"]
    finally:
        if gc_was_enabled:
            gc.enable()
        case.zero_grad()
    return [f"{title}: {steps} steps of `y = layer(x); y.backward(g)` (grads set to None "
            f"between them, after {warmup} untimed) under torch.profiler, CPU activities; "
            f"top {ROWS} ops by self CPU time",
            table.rstrip(),
            f"per step: {self_us / steps:.1f} µs self CPU time of the profiled ops (their "
            f"total / {steps}); {wall_s / steps * 1e6:.1f} µs wall clock under the profiler, "
            "which adds its own cost to every op"]
