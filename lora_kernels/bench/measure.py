"""Measuring the cases: the bytes autograd holds for backward (``held_bytes``)
and the timed repetitions (``run_cases``: round robin timed by
``time.perf_counter`` on CPU, ``triton.testing.do_bench`` on CUDA), one
``Result`` per provider.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import Case

HELD_METHOD = ("held MB: bytes of the distinct storages autograd saves for backward during one "
               "forward (torch.autograd.graph.saved_tensors_hooks; sees save_for_backward of "
               "torch ops, autograd.Functions and torch.library custom ops), less the layer's "
               "parameters/buffers, the input and the output")


def held_bytes(case: Case) -> int:
    """Bytes autograd holds for backward after one forward (see the package docstring)."""
    case.zero_grad()
    saved: Dict[tuple, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            saved[(t.device, st.data_ptr())] = st.nbytes()
        except Exception:  # a tensor without a plain storage: count its elements
            saved[("id", id(t))] = t.numel() * t.element_size()
        return t

    with case.using_backend(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = case.forward()
    mine = list(case.owned) + [t for t in (case.x, y) if t is not None]
    for t in mine:
        saved.pop((t.device, t.untyped_storage().data_ptr()), None)
    total = sum(saved.values())
    if case.backward:
        with case.using_backend():
            y.backward(case.grad)  # frees the graph
    del y
    case.zero_grad()
    return total


def _quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class Result:
    provider: str
    tokens: int
    times_ms: List[float]
    held: int
    peak: Optional[int] = None
    # (median, p20, p80) when the timer reports quantiles (do_bench), not times
    quantiles: Optional[Tuple[float, float, float]] = None

    @property
    def median(self):
        return self.quantiles[0] if self.quantiles else _quantile(self.times_ms, 0.5)

    @property
    def p20(self):
        return self.quantiles[1] if self.quantiles else _quantile(self.times_ms, 0.2)

    @property
    def p80(self):
        return self.quantiles[2] if self.quantiles else _quantile(self.times_ms, 0.8)


# How the timed repetitions are run: "round_robin" (time.perf_counter, providers
# interleaved; the CPU default) or "do_bench" (triton.testing.do_bench, one
# provider after another; the CUDA default).
TIMINGS = ("round_robin", "do_bench")


def default_timing(device) -> str:
    return "do_bench" if torch.device(device).type == "cuda" else "round_robin"


def _do_bench(fn: Callable[[], None], warmup_ms: float, rep_ms: float) -> List[float]:
    """[median, p20, p80] in ms of ``fn`` by ``triton.testing.do_bench``."""
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


def timing_note(timing: str, repeat: int, warmup: int, warmup_ms: float, rep_ms: float,
                x_floor: bool = True) -> str:
    """How the times were taken (and, with ``x_floor``, what the x floor column is)."""
    what = "`y = layer(x); y.backward(g)`"
    tail = "; x floor = median / floor's median" if x_floor else ""
    if timing == "do_bench":
        return (f"times: triton.testing.do_bench (CUDA events, L2 cache cleared before each run) "
                f"of {what} with the grads set to None inside the timed callable, "
                f"warmup {warmup_ms:g} ms, rep {rep_ms:g} ms, providers one after another "
                f"(after {warmup} untimed steps each); median, p20, p80 from "
                "quantiles=[0.5, 0.2, 0.8]" + tail)
    return (f"times: wall clock (time.perf_counter) of {what} over {repeat} repetitions "
            f"(+{warmup} warmup), grads set to None between them, providers interleaved "
            "round robin" + tail)


def run_cases(cases: Dict[str, Case], repeat: int, warmup: int, device, progress=None,
              timing: Optional[str] = None, warmup_ms: float = 25.0, rep_ms: float = 100.0
              ) -> Dict[str, Result]:
    """Warm up, measure held bytes (and peak memory on CUDA), then time: with
    ``timing="round_robin"`` (the CPU default) ``repeat`` round-robin repetitions
    timed by ``time.perf_counter``; with ``"do_bench"`` (the CUDA default)
    ``triton.testing.do_bench`` per provider (``warmup_ms``, ``rep_ms``;
    ``repeat`` unused). A provider that raises is marked skipped
    (``case.skip``) and left out."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    timing = default_timing(device) if timing is None else timing
    if timing not in TIMINGS:
        raise ValueError(f"timing: got {timing!r}, expected one of {', '.join(TIMINGS)}")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    active = [c for c in cases.values() if c.skip is None]
    held, peak = {}, {}
    for c in list(active):
        done = 0
        try:
            for _ in range(warmup):
                c.zero_grad()
                c.step()
                done += 1
                if progress is not None:
                    progress.update(1)
            held[c.provider] = held_bytes(c)
            if cuda:
                c.zero_grad()
                sync()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                c.step()
                sync()
                peak[c.provider] = torch.cuda.max_memory_allocated(device) - base
        except Exception as e:
            c.skip = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            active.remove(c)
            if progress is not None:
                progress.update(warmup + repeat - done)
    if timing == "do_bench":
        return _run_do_bench(active, held, peak, repeat, warmup_ms, rep_ms, progress)
    times = {c.provider: [] for c in active}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(repeat):
            shift = rep % max(len(active), 1)
            for c in active[shift:] + active[:shift]:
                c.zero_grad()
                sync()
                t0 = time.perf_counter()
                c.step()
                sync()
                times[c.provider].append((time.perf_counter() - t0) * 1e3)
                if progress is not None:
                    progress.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
    for c in active:
        c.zero_grad()
    return {c.provider: Result(c.provider, c.tokens, times[c.provider], held[c.provider],
                               peak.get(c.provider)) for c in active}


def _run_do_bench(active: List[Case], held, peak, repeat, warmup_ms, rep_ms, progress
                  ) -> Dict[str, Result]:
    out = {}
    for c in list(active):
        def fn(c=c):
            c.zero_grad()
            c.step()
        try:
            med, p20, p80 = _do_bench(fn, warmup_ms, rep_ms)
        except Exception as e:
            c.skip = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            active.remove(c)
        else:
            out[c.provider] = Result(c.provider, c.tokens, [], held[c.provider],
                                     peak.get(c.provider), (med, p20, p80))
        c.zero_grad()
        if progress is not None:
            progress.update(repeat)
    return out
