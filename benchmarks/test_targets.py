"""benchmarks/targets.py reads a bench CSV and tells met, missed and missing targets apart."""
import csv
import importlib.util
import pathlib
import sys

import pytest

from lora_kernels.bench import CSV_COLUMNS

_spec = importlib.util.spec_from_file_location(
    "bench_targets", pathlib.Path(__file__).with_name("targets.py"))
targets = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = targets  # dataclasses look their module up there
_spec.loader.exec_module(targets)

LINEAR = "lora_linear_in4096_out4096_r16_p0.05_float32"


def rows(kernel, tokens, **medians):
    out = []
    for provider, ms in medians.items():
        common = dict(kernel=kernel, provider=provider, mode="full", x=tokens, device="cpu",
                      version="test", p20=ms, p80=ms)
        out.append(dict(common, metric="speed", unit="ms", median=ms))
        out.append(dict(common, metric="memory", unit="MB", median=999.0))
    return out


def target(name_part):
    return next(t for t in targets.TARGETS if name_part in t.name)


@pytest.mark.parametrize("ms, status", [(104.0, "ok"), (105.0, "ok"), (106.0, "MISSED")])
def test_floor_ratio(ms, status):
    m = targets.read_medians(rows(LINEAR, 2048, floor=100.0, lora_kernels=ms))
    c = targets.check(target("Linear 4096²"), m)
    assert c.figure == pytest.approx(ms / 100.0) and c.status == status


def test_memory_rows_and_other_tokens_are_not_times():
    m = targets.read_medians(rows(LINEAR, 1024, floor=100.0, lora_kernels=100.0)
                             + [dict(r, metric="memory") for r in rows(LINEAR, 2048, floor=1.0,
                                                                       lora_kernels=1.0)])
    assert targets.check(target("Linear 4096²"), m).status == "not run"


def test_last_row_wins():
    m = targets.read_medians(rows(LINEAR, 2048, floor=100.0, lora_kernels=120.0)
                             + rows(LINEAR, 2048, floor=100.0, lora_kernels=101.0))
    assert targets.check(target("Linear 4096²"), m).status == "ok"


@pytest.mark.parametrize("ms, status", [(140.0, "ok"), (150.0, "ok"), (151.0, "MISSED")])
def test_bound_is_loralibs_figure(ms, status):
    m = targets.read_medians(rows(targets.SMALL, 64, floor=100.0, lora_kernels=ms,
                                  loralib=150.0))
    c = targets.check(target("64 tokens"), m)
    assert c.bound == pytest.approx(1.5) and c.status == status
    assert targets.check(target("16 tokens"), m).status == "not run"


@pytest.mark.parametrize("ms, status", [(1.6, "ok"), (1.7, "ok"), (1.71, "MISSED")])
def test_host_cost_above_floor(ms, status):
    # above floor: (ms - 1) ÷ (2 - 1), bound 0.7
    m = targets.read_medians(rows(targets.OVERHEAD.format(p="0"), 16, floor=1.0,
                                  lora_kernels=ms, loralib=2.0))
    c = targets.check(target("dropout 0,"), m)
    assert c.status == status
    # no loralib row: nothing to compare with
    m = targets.read_medians(rows(targets.OVERHEAD.format(p="0"), 16, floor=1.0,
                                  lora_kernels=ms))
    assert targets.check(target("dropout 0,"), m).status == "not run"


def write(path, data):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(data)


def all_met():
    data = []
    for t in targets.TARGETS:
        data += rows(t.kernel, t.tokens, floor=1.0, lora_kernels=1.0, loralib=2.0)
    return data


def test_main_exit_status(tmp_path, capsys):
    path = tmp_path / "cpu.csv"
    write(path, all_met())
    assert targets.main([str(path)]) == 0
    assert "MISSED" not in capsys.readouterr().out
    write(path, all_met() + rows(LINEAR, 2048, floor=1.0, lora_kernels=2.0))
    assert targets.main([str(path)]) == 1
    assert "MISSED" in capsys.readouterr().out
    write(path, [r for r in all_met() if r["kernel"] != LINEAR])
    assert targets.main([str(path)]) == 2
    with pytest.raises(SystemExit):
        targets.main([str(tmp_path / "missing.csv")])
    assert "missing.csv" in capsys.readouterr().err
