"""``python -m lora_kernels.bench`` on tiny shapes: the table, the CSV, the plot,
the bytes-held measure, and that every provider computes the same layer."""
import csv
import math
import os

import pytest
import torch

from lora_kernels import backends, bench

TINY = ["--in-features", "24", "--out-features", "48", "--rank", "4", "--repeat", "1",
        "--warmup", "0", "--threads", "1", "--no-progress"]
TABLE_HEAD = ["tokens", "provider", "median ms", "p20 ms", "p80 ms", "x floor", "held MB"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes on a shared machine: one thread avoids OpenMP stalls (main()
    restores the count itself; the direct make_providers tests need this)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _table(out: str):
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("tokens  provider"))
    head = [c for c in lines[i].split("  ") if c.strip()]
    rows = []
    for line in lines[i + 2:]:
        if not line.strip():
            continue
        if not line[0].isdigit():
            break
        rows.append(line.split())
    return [c.strip() for c in head], rows


def test_cli_table_csv_plot(tmp_path, capsys):
    path, png = tmp_path / "out" / "bench.csv", tmp_path / "bench.png"
    argv = TINY + ["--tokens", "8", "16", "--csv", str(path), "--plot", str(png)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "command: python -m lora_kernels.bench --in-features 24" in out
    assert "saved_tensors_hooks" in out  # the held-bytes method is stated
    head, rows = _table(out)
    assert head == TABLE_HEAD
    ran = {r[1] for r in rows}
    assert {"floor", "reference", "loralib"} <= ran
    assert "triton" not in out and "cuda " not in out  # not in the CPU defaults
    assert "time.perf_counter" in out and "round robin" in out  # the timing method is stated
    assert len(rows) == 2 * len(ran) and {r[0] for r in rows} == {"8", "16"}
    for r in rows:
        assert len(r) == len(TABLE_HEAD)
        median, p20, p80 = map(float, r[2:5])
        assert 0 < p20 <= median <= p80
    assert all(r[5] == "1.00" for r in rows if r[1] == "floor")

    with open(path, newline="") as f:
        first = f.readline().strip().split(",")
        f.seek(0)
        recs = list(csv.DictReader(f))
    assert tuple(first) == bench.CSV_COLUMNS
    assert len(recs) == 2 * 2 * len(ran)  # speed + memory, per tokens, per provider
    kernel = "lora_linear_in24_out48_r4_p0.05_float32"
    assert {r["kernel"] for r in recs} == {kernel}
    assert {(r["metric"], r["unit"]) for r in recs} == {("speed", "ms"), ("memory", "MB")}
    assert {r["mode"] for r in recs} == {"full"} and {r["x"] for r in recs} == {"8", "16"}
    assert {r["device"] for r in recs} == {"cpu"} and all(r["version"] for r in recs)
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"

    # Appending: no second header.
    assert bench.main(TINY + ["--tokens", "8", "--providers", "floor", "--csv", str(path)]) == 0
    text = path.read_text()
    assert text.count("kernel,provider") == 1
    assert len(list(csv.DictReader(text.splitlines()))) == len(recs) + 2


@pytest.mark.parametrize("layer", ["merged", "embedding", "conv2d"])
def test_cli_other_layers(layer, capsys):
    assert bench.main(["--layer", layer, "--tokens", "16"] + TINY) == 0
    out = capsys.readouterr().out
    head, rows = _table(out)
    assert head == TABLE_HEAD and {"floor", "reference"} <= {r[1] for r in rows}
    if layer == "merged":
        assert "peft          skipped: PEFT has no MergedLinear" in out
    if layer == "conv2d":
        assert {r[0] for r in rows} == {"16"}  # one 4x4 image


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--providers", "floor,nope"])
    with pytest.raises(SystemExit):
        bench.main(["--layer", "merged", "--out-features", "64", "--enable-lora", "1,0,1"])
    assert "multiple of len(enable_lora)=3" in capsys.readouterr().err


def test_held_bytes_is_measured():
    tokens, r = 32, 4
    kw = dict(in_features=16, out_features=24, tokens=tokens, rank=r, dropout=0.0)
    cases = bench.make_providers("linear", **kw)
    # Frozen nn.Linear needs only W (a parameter) for the input gradient.
    assert bench.held_bytes(cases["floor"]) == 0
    # loralib without dropout keeps x·Aᵀ (x and the parameters are not counted).
    assert bench.held_bytes(cases["loralib"]) == tokens * r * 4
    # The custom op's save_for_backward is seen: s = x·Aᵀ at least.
    assert bench.held_bytes(cases["lora_kernels"]) >= tokens * r * 4
    # With dropout, loralib keeps the dropped copy of x as well.
    p = bench.make_providers("linear", **dict(kw, dropout=0.1), providers=["loralib"])
    assert bench.held_bytes(p["loralib"]) >= tokens * 16 * 4 + tokens * r * 4


@pytest.mark.parametrize("layer", bench.LAYERS)
def test_providers_compute_the_same_layer(layer):
    """Identical weights and inputs: without dropout every LoRA provider gives
    the same output (PEFT's conv has its own factorisation and is left out)."""
    kw = dict(in_features=12, out_features=18, tokens=16, rank=2, dropout=0.0,
              dtype="float64", kernel_size=3, image_size=4)
    cases = bench.make_providers(layer, **kw, providers=bench.PROVIDERS)
    ref = cases["reference"].forward().detach()
    for name in ("lora_kernels", "triton", "cuda", "loralib", "peft"):
        c = cases[name]
        if c.skip or (layer == "conv2d" and name == "peft"):
            continue
        with c.using_backend():
            y = c.forward().detach()
        torch.testing.assert_close(y, ref, msg=f"{layer}/{name}")
    floor = cases["floor"].forward().detach()
    assert not torch.allclose(floor, ref)  # B ≠ 0: the low-rank branch is really computed


def test_default_providers_depend_on_device():
    assert bench.default_providers("cpu") == ("floor", "reference", "lora_kernels", "loralib",
                                              "peft")
    cuda = bench.default_providers("cuda")
    assert {"triton", "cuda"} <= set(cuda) and "lora_kernels" not in cuda
    assert set(cuda) | set(bench.default_providers("cpu")) == set(bench.PROVIDERS)
    assert set(bench.make_providers("linear", in_features=8, out_features=8, tokens=4,
                                    rank=2)) == set(bench.default_providers("cpu"))


def test_backend_providers_skipped_with_reasons(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = TINY + ["--tokens", "8", "--providers", "floor", "triton", "cuda"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    _, rows = _table(out)
    assert [r[1] for r in rows] == ["floor"]
    assert ("triton        skipped: backend triton cannot run on cpu: "
            + "; ".join(backends.reasons("triton", "cpu"))) in out
    assert "TRITON_INTERPRET is not set" in out
    assert ("cuda          skipped: backend cuda cannot run on cpu: "
            + "; ".join(backends.reasons("cuda", "cpu"))) in out


def _spy(monkeypatch, name, calls):
    module = backends.get(name)
    for fn in ("lora_linear_fwd", "lora_linear_bwd"):
        real = getattr(module, fn)

        def spy(*args, _real=real, _fn=fn, **kw):
            calls.append((name, _fn))
            return _real(*args, **kw)
        monkeypatch.setattr(module, fn, spy)


def test_case_backend_is_honoured_forward_and_backward(monkeypatch):
    """Case.backend covers the forward and the backward (which dispatches the
    ops again), in step() and in held_bytes(), and is undone afterwards."""
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    calls = []
    _spy(monkeypatch, "reference", calls)
    _spy(monkeypatch, "cpu", calls)
    kw = dict(in_features=8, out_features=12, tokens=4, rank=2, dropout=0.1)
    case = bench.make_providers("linear", **kw, providers=["lora_kernels"])["lora_kernels"]
    assert case.backend is None
    case.step()
    assert calls == []  # auto: the dispatcher's C++ kernels, no Python backend call

    calls.clear()
    case.backend = "reference"
    case.zero_grad()
    case.step()
    assert calls == [("reference", "lora_linear_fwd"), ("reference", "lora_linear_bwd")]
    assert all(t.grad is not None for t in case.trainable) and case.x.grad is not None
    calls.clear()
    bench.held_bytes(case)
    assert calls == [("reference", "lora_linear_fwd"), ("reference", "lora_linear_bwd")]
    assert backends.requested() == "auto" and "LORA_KERNELS_BACKEND" not in os.environ

    # The forced providers carry their backend.
    forced = bench.make_providers("linear", **kw, providers=["triton", "cuda"])
    assert forced["triton"].backend == "triton" and forced["cuda"].backend == "cuda"
    assert forced["cuda"].skip.startswith("backend cuda cannot run on cpu: ")


def test_forced_backend_restores_the_choice(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    with pytest.raises(RuntimeError):
        with bench.forced_backend("reference"):
            assert backends.requested() == "reference"
            raise RuntimeError
    assert os.environ["LORA_KERNELS_BACKEND"] == "auto" and backends.requested() == "auto"
    with bench.forced_backend(None):
        assert backends.requested() == "auto"


def test_do_bench_timing_wiring(monkeypatch):
    """The CUDA timing path with triton's do_bench replaced by a fake (it needs a
    GPU): the timed callable sets grads to None then steps; the quantiles land
    in the Result. The real do_bench is only exercised by benchmarks/gpu_check.sh."""
    kw = dict(in_features=8, out_features=12, tokens=4, rank=2, dropout=0.0, dtype="float64")
    cases = bench.make_providers("linear", **kw, providers=["floor", "loralib"])
    once = bench.make_providers("linear", **kw, providers=["loralib"])["loralib"]
    once.step()
    seen, grads = [], []

    def fake(fn, warmup_ms, rep_ms):
        seen.append((warmup_ms, rep_ms))
        for _ in range(2):
            fn()  # B's grad would double if fn did not set it to None first
        grads.append(cases["loralib"].trainable[1].grad)  # None after floor's turn
        return [2.0, 1.0, 3.0]
    monkeypatch.setattr(bench.measure, "_do_bench", fake)  # where run_cases looks it up
    res = bench.run_cases(cases, repeat=5, warmup=1, device="cpu", timing="do_bench",
                          warmup_ms=7, rep_ms=11)
    assert seen == [(7, 11), (7, 11)] and set(res) == {"floor", "loralib"}
    r = res["loralib"]
    assert (r.median, r.p20, r.p80) == (2.0, 1.0, 3.0) and r.times_ms == []
    assert grads[0] is None
    torch.testing.assert_close(grads[1], once.trainable[1].grad)
    assert cases["loralib"].trainable[1].grad is None  # set to None after timing
    assert "do_bench" in bench.timing_note("do_bench", 5, 1, 7, 11)
    assert bench.default_timing("cuda") == "do_bench"
    assert bench.default_timing("cpu") == "round_robin"
    with pytest.raises(ValueError):
        bench.run_cases(cases, 1, 0, "cpu", timing="nope")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton provider on CPU needs TRITON_INTERPRET=1 (interpreter)")
def test_cli_triton_provider_under_interpreter(capsys):
    argv = ["--in-features", "16", "--out-features", "24", "--rank", "2", "--repeat", "2",
            "--warmup", "1", "--threads", "1", "--no-progress", "--tokens", "8",
            "--providers", "floor", "triton"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    _, rows = _table(out)
    row = next(r for r in rows if r[1] == "triton")
    median, p20, p80 = map(float, row[2:5])
    assert all(math.isfinite(v) and v > 0 for v in (median, p20, p80))
    assert "triton backend forced (forward and backward)" in out


def test_heap_line_and_option(capsys):
    """The header says what was done to the allocator: on glibc the default
    'kept' sets mallopt and says so; --heap default leaves glibc alone."""
    import platform

    assert bench.main(TINY + ["--tokens", "8", "--heap", "default"]) == 0
    assert "heap: allocator defaults" in capsys.readouterr().out
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert bench.main(TINY + ["--tokens", "8"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("heap:"))
    if glibc:
        assert "freed memory kept for reuse (mallopt M_MMAP_MAX=0" in line
    else:
        assert line == "heap: allocator defaults"
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--heap", "never"])


OVERHEAD_TINY = ["--overhead", "--repeat", "3", "--warmup", "1", "--no-progress"]
OVERHEAD_HEAD = ["tokens", "provider", "median µs", "p20 µs", "p80 µs", "above floor µs",
                 "x loralib"]


def _tables(out: str):
    """Every table in ``out``: (the line above it, its head, its rows)."""
    lines = out.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("tokens  provider"):
            _, rows = _table("\n".join(lines[i:]))
            found.append((lines[i - 1], [c.strip() for c in line.split("  ") if c.strip()],
                          rows))
    return found


def test_overhead_mode_tables(capsys):
    """--overhead: the preset's shape, providers and dropout values, a table per
    dropout value with the cost above the floor and the ratio to loralib's."""
    assert bench.main(OVERHEAD_TINY) == 0
    out = capsys.readouterr().out
    assert "command: python -m lora_kernels.bench --overhead --repeat 3" in out
    assert ", 1 torch threads," in out and "round robin" in out and "heap:" in out
    assert "median ms" not in out and "held MB" not in out
    tables = _tables(out)
    kernel = "lora_linear_in64_out64_r8_p{}_float32"
    assert [t[0] for t in tables] == [f"dropout 0.05: {kernel.format('0.05')}",
                                      f"dropout 0: {kernel.format('0')}"]
    for _, head, rows in tables:
        assert head == OVERHEAD_HEAD
        assert [r[1] for r in rows] == ["floor", "lora_kernels", "loralib", "peft"]
        assert all(len(r) == len(head) and r[0] == "16" for r in rows)
        by = {r[1]: r for r in rows}
        floor = float(by["floor"][2])
        for r in rows:
            median, p20, p80 = map(float, r[2:5])
            assert 0 < p20 <= median <= p80
            assert float(r[5]) == pytest.approx(median - floor, abs=0.11)  # rounding to 0.1
        assert by["floor"][5] == "0.0"
        assert by["loralib"][6] == "1.00"
        ratio = float(by["lora_kernels"][6])
        assert math.isfinite(ratio)
        loralib = float(by["loralib"][5])
        if abs(loralib) >= 10:  # the printed values are rounded to 0.1 µs
            assert ratio == pytest.approx(float(by["lora_kernels"][5]) / loralib, rel=0.02,
                                          abs=0.011)


def test_overhead_options_override_the_preset(tmp_path, capsys):
    path = tmp_path / "overhead.csv"
    argv = OVERHEAD_TINY + ["--providers", "floor", "lora_kernels", "--dropout", "0.1",
                            "--tokens", "8", "--in-features", "24", "--csv", str(path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    tables = _tables(out)
    assert [t[0] for t in tables] == ["dropout 0.1: lora_linear_in24_out64_r8_p0.1_float32"]
    rows = tables[0][2]
    assert [(r[0], r[1]) for r in rows] == [("8", "floor"), ("8", "lora_kernels")]
    assert all(r[6] == "-" for r in rows)  # no loralib to compare with
    with open(path, newline="") as f:
        recs = list(csv.DictReader(f))
    assert {r["kernel"] for r in recs} == {"lora_linear_in24_out64_r8_p0.1_float32"}
    assert len(recs) == 2 * 2  # speed + memory per provider


def test_overhead_and_dropout_arguments_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--dropout", "0.1", "0"])
    assert "--dropout: got [0.1, 0.0], expected one value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(OVERHEAD_TINY + ["--dropout", "0.1", "1.5"])
    assert "--dropout: got 1.5, expected floats in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(OVERHEAD_TINY + ["--plot", "x.png"])
    assert "--plot: got 'x.png', expected none with --overhead" in capsys.readouterr().err


def test_profile_in_both_modes(capsys):
    """--profile prints the profiler's table of a lora_kernels step after the
    timing: at each dropout value with --overhead, once in the table mode."""
    argv = OVERHEAD_TINY + ["--providers", "floor", "loralib", "--profile",
                            "--profile-steps", "3"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert len(_tables(out)) == 2
    heads = [x for x in out.splitlines() if x.startswith("profile: ")]
    assert [h.split(":")[1] for h in heads] == [" lora_kernels, tokens 16, dropout 0.05",
                                                " lora_kernels, tokens 16, dropout 0"]
    assert all("3 steps of `y = layer(x); y.backward(g)`" in h for h in heads)
    assert out.count("Self CPU time total") == 2 and out.count("per step: ") == 2
    assert "lora_kernels::lora_linear_fwd" in out  # the op of the profiled layer

    assert bench.main(TINY + ["--tokens", "8", "--providers", "floor", "--profile",
                              "--profile-steps", "2"]) == 0
    out = capsys.readouterr().out
    head, _ = _table(out)
    assert head == TABLE_HEAD
    assert "profile: lora_kernels, tokens 8, dropout 0.05: 2 steps" in out
    assert out.count("Self CPU time total") == 1


def test_profile_failure_is_one_line(monkeypatch, capsys):
    import torch.profiler

    def broken(*args, **kw):
        raise RuntimeError("no profiler here")
    monkeypatch.setattr(torch.profiler, "profile", broken)
    assert bench.main(TINY + ["--tokens", "8", "--providers", "floor", "--profile"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == ("profile: lora_kernels, tokens 8, dropout 0.05: "
                                             "the profiler failed (RuntimeError: no profiler "
                                             "here)")


def test_dora_providers_compute_the_same_layer_and_the_cli_row(capsys):
    kw = dict(in_features=12, out_features=18, tokens=16, rank=2, dropout=0.0, dtype="float64")
    cases = bench.make_providers("linear", **kw, providers=bench.PROVIDERS, dora=True)
    assert cases["loralib"].skip == "loralib has no DoRA"
    ref = cases["reference"].forward().detach()
    for name in ("lora_kernels", "peft"):
        torch.testing.assert_close(cases[name].forward().detach(), ref, msg=name)
    assert bench.main(TINY + ["--dora", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "lora_linear_in24_out48_dora_r4" in out and "lora_kernels.DoraLinear" in out
    with pytest.raises(SystemExit):
        bench.main(["--layer", "embedding", "--dora"])
    assert "--dora: given with --layer embedding" in capsys.readouterr().err
