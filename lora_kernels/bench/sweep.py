"""One measured sweep over the ``--tokens`` values: at each, the providers are
built (``make_providers``) and timed (``run_cases``), and the results come back
with what the run says about each provider (its description, or why it did not
run) and its version. Both modes of the command line run it: the table, and
``--overhead`` once per dropout value.
"""
from __future__ import annotations

import gc
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .cases import make_providers
from .measure import Result, run_cases


@dataclass
class Sweep:
    results: List[Result] = field(default_factory=list)  # per tokens, in --providers order
    notes: Dict[str, str] = field(default_factory=dict)  # description, or why it did not run
    versions: Dict[str, str] = field(default_factory=dict)


def progress_bar(total: int, disable: bool):
    """A tqdm bar of ``total`` steps on stderr (disabled when stderr is not a terminal)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="bench", unit="step", leave=False,
                disable=disable or not sys.stderr.isatty())


def sweep(args, setup: dict, dropout: float, providers: Sequence[str], timing: str, bar,
          ap) -> Sweep:
    """Time ``providers`` at each of ``args.tokens`` (``args.repeat``, ``args.warmup``,
    ``args.warmup_ms``, ``args.rep_ms``). ``setup``: the keywords of
    ``make_providers`` other than tokens, dropout and providers. A setting that
    ``make_providers`` refuses is reported by ``ap.error`` (``bar`` closed first)."""
    out = Sweep()
    for tokens in args.tokens:
        try:
            cases = make_providers(tokens=tokens, dropout=dropout, providers=providers, **setup)
        except ValueError as e:
            bar.close()
            ap.error(str(e))
        for c in cases.values():
            if c.skip is not None:
                bar.update(args.warmup + args.repeat)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="lora_kernels: running the unfused")
            res = run_cases(cases, args.repeat, args.warmup, setup["device"], bar, timing,
                            args.warmup_ms, args.rep_ms)
        for c in cases.values():
            if c.skip is not None:
                failed = c.skip.startswith(("failed", "setup failed"))
                out.notes.setdefault(c.provider, c.skip if failed else f"skipped: {c.skip}")
            else:
                out.notes.setdefault(c.provider, c.description)
                out.versions[c.provider] = c.version
        out.results += [res[name] for name in providers if name in res]
        del cases, res
        gc.collect()
    return out
