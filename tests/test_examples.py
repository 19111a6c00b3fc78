"""The runnable examples in python/ run and learn."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from bnb_support import bnb_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    if os.path.join(ROOT, "python") not in sys.path:  # the examples import each other
        sys.path.insert(0, os.path.join(ROOT, "python"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "python", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finetune_tiny_learns():
    losses, acc = _load("finetune_tiny").main(["--steps", "60", "--dim", "64", "--depth", "1",
                                               "--vocab", "64", "--batch", "16", "--seq", "16"])
    assert losses[-1] < 0.5 * losses[0]


def test_peft_finetune_patched_matches_peft_and_holds_less():
    losses, memory, _ = _load("peft_finetune").main(
        ["--steps", "4", "--hidden", "64", "--seq", "8", "--batch", "4"])
    # Same weights; only the dropout masks differ (each draws its own).
    assert abs(losses["peft"][0] - losses["patched"][0]) < 0.05
    assert memory["patched"] < memory["peft"]


def test_peft_finetune_gpt2_without_dropout_equals_peft():
    losses, memory, _ = _load("peft_finetune").main(
        ["--model", "gpt2", "--steps", "3", "--hidden", "64", "--seq", "8", "--batch", "4",
         "--dropout", "0"])
    for a, b in zip(losses["peft"], losses["patched"]):
        assert abs(a - b) < 1e-4
    assert memory["patched"] <= memory["peft"] + 1e-3  # + the 8-byte seeds


@pytest.mark.skipif(bnb_reason() is not None, reason=str(bnb_reason()))
def test_peft_finetune_dora_without_dropout_equals_peft_and_holds_less():
    losses, memory, _ = _load("peft_finetune").main(
        ["--dora", "--targets", "all", "--steps", "3", "--hidden", "64", "--seq", "8",
         "--batch", "4", "--dropout", "0"])
    for a, b in zip(losses["peft"], losses["patched"]):
        assert abs(a - b) < 1e-4 * abs(b)
    assert memory["patched"] < memory["peft"]


def test_qlora_finetune_fuses_all_and_equals_peft_without_dropout():
    args = ["--steps", "3", "--hidden", "128", "--seq", "8", "--batch", "2"]
    losses, memory, _ = _load("qlora_finetune").main(args + ["--dtype", "float32",
                                                              "--dropout", "0"])
    for a, b in zip(losses["peft"], losses["patched"]):
        assert abs(a - b) < 1e-4 * abs(b)
    losses, memory, _ = _load("qlora_finetune").main(args)  # bf16, dropout 0.05
    assert abs(losses["peft"][0] - losses["patched"][0]) < 0.05
    assert memory["patched"] < 0.75 * memory["peft"]


def test_convert_adapter_round_trips_both_ways(tmp_path):
    diff_in, diff_out = _load("convert_adapter").main(["--out", str(tmp_path), "--steps", "2"])
    assert diff_in < 1e-4 and diff_out < 1e-4
    assert (tmp_path / "lora_kernels_adapter" / "adapter_model.safetensors").exists()


def test_adalora_tiny_moves_the_budget_and_learns():
    history = _load("adalora_tiny").main(["--steps", "60", "--tinit", "5", "--tfinal", "15"])
    first, last = history[0], history[-1]
    assert last[2] == 3 * 3 and sum(last[3]) == 9     # target_r 3 × 3 layers
    assert last[1] < 0.7 * first[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp_finetune_runs_under_torchrun(tmp_path):
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "python", "fsdp_finetune.py"), "--steps", "3", "--hidden", "64",
           "--seq", "8", "--batch", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = proc.stdout
    assert "FSDP2 over 2 processes (gloo, cpu)" in text
    assert "patch_peft fused 14 of 14 LoRA layers" in text
    for r in (0, 1):
        for k in ("peft", "patched"):
            assert re.search(rf"^\s+{r} {k}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M), text
    # Same start; only the dropout masks differ.
    first = re.search(r"step\s+0\s+loss peft ([\d.]+)\s+loss patched ([\d.]+)", text)
    assert abs(float(first[1]) - float(first[2])) < 0.05
    from peft import PeftModel

    base = _load("fsdp_finetune").build(
        type("Args", (), dict(seed=0, vocab=64, hidden=64, layers=2, seq=8))())
    loaded = PeftModel.from_pretrained(base, str(out))
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 14
