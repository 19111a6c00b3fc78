"""FSDP2 and DDP with lora_kernels layers and with patched PEFT models.

The cases (tests/distributed_cases.py) run once, in two processes over gloo
on the CPU (``torchrun --standalone --nproc-per-node 2``); each test here
reports one case on both ranks:

* gradients of a sharded model equal a single-process run on the whole batch
  (lora_kernels layers; PEFT patched before and after ``fully_shard``);
* ``model.eval()`` merges on the shards (outputs equal the unsharded model's; DoraLinear too)
  and ``model.train()`` unmerges (weights back to the originals), also with
  the root left unsharded after a forward and with reshard_after_forward off;
* MixedPrecisionPolicy (bf16 parameters, fp32 reduce), activation
  checkpointing inside the sharded blocks, torch.distributed.checkpoint save
  and load (also of a merged model), the adapter alone in PEFT's format
  written by rank 0, meta-device construction with fresh adapters, and DDP.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_cases import CASES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={RANKS}", os.path.join(HERE, "distributed_cases.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    found = []
    for r in range(RANKS):
        path = out / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} wrote no results (exit {proc.returncode}):\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        found.append(json.loads(path.read_text()))
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes(results, name):
    for r, res in enumerate(results):
        outcome = res.get(name, "not run")
        if outcome.startswith("skip:"):
            pytest.skip(outcome[5:].strip())
        assert outcome == "ok", f"rank {r}:\n{outcome}"
