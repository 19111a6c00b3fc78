"""``python -m lora_kernels.bench`` on tiny shapes: the table, the CSV, the plot,
the bytes-held measure, and that every provider computes the same layer."""
import csv

import pytest
import torch

from lora_kernels import bench

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
    cases = bench.make_providers(layer, **kw)
    ref = cases["reference"].forward().detach()
    for name in ("lora_kernels", "loralib", "peft"):
        c = cases[name]
        if c.skip or (layer == "conv2d" and name == "peft"):
            continue
        torch.testing.assert_close(c.forward().detach(), ref, msg=f"{layer}/{name}")
    floor = cases["floor"].forward().detach()
    assert not torch.allclose(floor, ref)  # B ≠ 0: the low-rank branch is really computed
