"""pytest-benchmark over the setups of ``python -m lora_kernels.bench``: one test per
(layer, provider), forward + backward, small shapes.

    pytest benchmarks/                                 # timings, grouped by layer
    pytest benchmarks/ --benchmark-disable             # each step once (a smoke test)
    OMP_NUM_THREADS=1 pytest benchmarks/               # on a machine shared with other work

Each test also records the bytes held for backward (``extra_info["held_MB"]``,
measured as in the CLI) and checks that the step produced the LoRA gradients.

The suite runs on CPU. The backend providers (``triton``, ``cuda``: the
lora_kernels layer with that backend forced) run where their backend can and
are skipped with its reasons otherwise; ``triton`` is always skipped here, as on
CPU it needs ``TRITON_INTERPRET=1``, the interpreter, which is far too slow for
timing (GPU timings: ``python -m lora_kernels.bench --device cuda``).
"""
import pytest
import torch

from lora_kernels.bench import LAYERS, PROVIDERS, held_bytes, kernel_name, make_providers

# Providers this CPU suite never times, and why.
CPU_SKIP = {"triton": "triton on CPU runs only under TRITON_INTERPRET=1, the interpreter: far "
                      "too slow to time; use python -m lora_kernels.bench --device cuda"}

SHAPES = {
    "linear": dict(in_features=64, out_features=64, tokens=256),
    "merged": dict(in_features=64, out_features=192, tokens=256, enable_lora="1,0,1"),
    "embedding": dict(in_features=512, out_features=64, tokens=256),
    "conv2d": dict(in_features=16, out_features=16, tokens=256, kernel_size=3, image_size=16),
}
COMMON = dict(rank=8, dropout=0.05, dtype="float32", device="cpu")

pytestmark = pytest.mark.benchmark  # selectable with -m benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", LAYERS)
def test_layer(benchmark, layer, provider):
    if COMMON["device"] == "cpu" and provider in CPU_SKIP:
        pytest.skip(CPU_SKIP[provider])
    shape = SHAPES[layer]
    case = make_providers(layer, providers=[provider], **shape, **COMMON)[provider]
    if case.skip:
        pytest.skip(case.skip)
    benchmark.group = kernel_name(layer, shape["in_features"], shape["out_features"],
                                  COMMON["rank"], 0.0 if layer == "embedding" else
                                  COMMON["dropout"], COMMON["dtype"],
                                  shape.get("enable_lora", "1,0,1"), shape.get("kernel_size", 3))
    benchmark.extra_info.update(provider=provider, description=case.description,
                                version=case.version, tokens=case.tokens,
                                held_MB=held_bytes(case) / 2 ** 20)

    benchmark.pedantic(case.step, setup=case.zero_grad, rounds=20, warmup_rounds=2)

    # The timed step really ran backward into the LoRA parameters (and the input).
    for t in case.trainable:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    if case.backward and case.x.requires_grad:
        assert case.x.grad is not None
