"""AdaLoRA on the fused op: a frozen random MLP learns a new map while the
rank budget moves to the layers that need it.

Each hidden layer is a ``lora_kernels.adalora.SVDLinear`` (ΔW = B·(A⊙E)); the
``RankAllocator`` keeps the full budget for ``--tinit`` steps, then shrinks it
on a cubic schedule to ``--target-r`` per layer, masking the least important
singular values every ``--delta-t`` steps, and fixes the pattern for the last
``--tfinal`` steps. Printed: loss, the budget and each layer's rank.

    python python/adalora_tiny.py [--steps 120]
"""
import argparse

import torch
import torch.nn as nn

import lora_kernels as lora
from lora_kernels.adalora import RankAllocator, SVDLinear


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--init-r", type=int, default=8)
    ap.add_argument("--target-r", type=int, default=3)
    ap.add_argument("--tinit", type=int, default=10)
    ap.add_argument("--tfinal", type=int, default=30)
    ap.add_argument("--delta-t", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    d, r = args.dim, args.init_r
    model = nn.Sequential(SVDLinear(d, d, r=r, lora_alpha=2 * r), nn.GELU(),
                          SVDLinear(d, d, r=r, lora_alpha=2 * r), nn.GELU(),
                          SVDLinear(d, d, r=r, lora_alpha=2 * r))
    lora.mark_only_lora_as_trainable(model)
    # The task: a fixed "teacher" whose weights differ from the frozen
    # network's by low-rank updates of rank 1, 1 and 4: the budget should
    # move to the last layer.
    teacher = []
    for m, k in zip([m for m in model if isinstance(m, SVDLinear)], (1, 1, 4)):
        u, v = torch.randn(d, k), torch.randn(k, d)
        teacher.append(m.weight.detach() + 0.5 * (u @ v) / d ** 0.5)

    def target(x):
        h = nn.functional.gelu(x @ teacher[0].t() + model[0].bias.detach())
        h = nn.functional.gelu(h @ teacher[1].t() + model[2].bias.detach())
        return h @ teacher[2].t() + model[4].bias.detach()

    allocator = RankAllocator(model, target_r=args.target_r, init_r=r, tinit=args.tinit,
                              tfinal=args.tfinal, deltaT=args.delta_t, total_step=args.steps,
                              orth_reg_weight=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    history = []
    for step in range(args.steps):
        x = torch.randn(256, d)
        loss = nn.functional.mse_loss(model(x), target(x))
        (loss + allocator.orthogonal_regularization(model)).backward()
        opt.step()
        budget, _ = allocator.update_and_allocate(model, step)
        opt.zero_grad()
        ranks = [int((m.lora_E != 0).sum()) if step > args.tinit else m.r
                 for m in model if isinstance(m, SVDLinear)]
        history.append((step, loss.item(), budget, ranks))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}  budget {budget:3d}  "
                  f"ranks per layer {ranks}")
    print("rank pattern:", {k: sum(v) for k, v in (allocator.rank_pattern or {}).items()})
    return history


if __name__ == "__main__":
    main()
