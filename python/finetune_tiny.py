"""Fine-tune a tiny attention-free network with LoRA on a synthetic task.

A frozen random "pretrained" network learns a new linear map on top of its
features: only the LoRA tensors train. Runs in seconds on a CPU:

    python python/finetune_tiny.py --steps 200
    python python/finetune_tiny.py --lib loralib   # the same run with loralib
"""
import argparse
import importlib
import time

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, lora, dim, r, dropout):
        super().__init__()
        self.qkv = lora.MergedLinear(dim, 3 * dim, r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                     enable_lora=[True, False, True])
        self.up = lora.Linear(3 * dim, 4 * dim, r=r, lora_alpha=2 * r, lora_dropout=dropout)
        self.down = lora.Linear(4 * dim, dim, r=r, lora_alpha=2 * r, lora_dropout=dropout)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.qkv(x))))


class Net(nn.Module):
    def __init__(self, lora, vocab, dim, depth, r, dropout):
        super().__init__()
        self.emb = lora.Embedding(vocab, dim, r=r, lora_alpha=r)
        self.blocks = nn.Sequential(*[Block(lora, dim, r, dropout) for _ in range(depth)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.blocks(self.emb(idx)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="lora_kernels", choices=["lora_kernels", "loralib"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args(argv)

    lora = importlib.import_module(args.lib)
    torch.manual_seed(0)
    model = Net(lora, args.vocab, args.dim, args.depth, args.rank, args.dropout)
    lora.mark_only_lora_as_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.lib}: {trainable} trainable of {total} parameters")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    # Task: predict (token * 7 + 3) mod vocab at every position.
    gen = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        target = (idx * 7 + 3) % args.vocab
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    model.eval()  # merges every LoRA update into its frozen weight
    with torch.no_grad():
        idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        acc = (model(idx).argmax(-1) == (idx * 7 + 3) % args.vocab).float().mean().item()
    print(f"{elapsed / args.steps * 1e3:.1f} ms/step, eval accuracy (merged) {acc:.3f}")
    return losses, acc


if __name__ == "__main__":
    main()
