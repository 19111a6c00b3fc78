"""torch.compile traces the layers (fake kernels, registered autograd) in one graph."""
import pytest
import torch

import lora_kernels as lk


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_compiled_training_step_equals_eager(backend, p):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        lk.Embedding(20, 8, r=2),
        lk.Linear(8, 6, r=2, lora_dropout=p),
        lk.MergedLinear(6, 6, r=1, lora_dropout=p, enable_lora=[True, False]))
    for m in model:
        torch.nn.init.normal_(m.lora_B)
    idx = torch.randint(0, 20, (3, 4))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    compiled(idx).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    torch.manual_seed(1)
    model(idx).square().sum().backward()
    eager = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(eager) == 8  # 3×(A, B) and two biases
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
