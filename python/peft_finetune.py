"""Fine-tune a small Llama (or GPT-2) with PEFT LoRA, plain and patched.

The model is built from a transformers config with random weights (nothing is
downloaded) and learns a synthetic task: copy a random sequence after a
separator token. The same PEFT model (LoRA r=8 on q, k, v, o, up, down with
lora_dropout 0.05, ``--targets all`` adds gate; GPT-2: c_attn, c_proj, c_fc;
``--dora``: DoRA, PEFT's ``use_dora=True``) is trained twice from the
same start, once as PEFT runs it and once after ``lora_kernels.patch_peft``,
steps interleaved. Printed per variant: loss, time per step, and memory:
on CUDA the peak of ``torch.cuda.max_memory_allocated`` over a step; on the
CPU the bytes autograd holds for backward after one forward (activations).

    python python/peft_finetune.py                     # Llama, 40 steps
    python python/peft_finetune.py --model gpt2 --steps 20
    python python/peft_finetune.py --dora --targets all --hidden 512 --seq 64 --batch 4
    python python/peft_finetune.py --device cuda --dtype bfloat16 --hidden 1024
"""
import argparse
import copy
import statistics
import time

import torch

import lora_kernels


def build(args):
    import transformers

    torch.manual_seed(args.seed)
    if args.model == "llama":
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=2 * args.seq + 2)
        model = transformers.LlamaForCausalLM(config)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
        if getattr(args, "targets", "default") == "all":
            targets.insert(4, "gate_proj")
    else:
        config = transformers.GPT2Config(
            vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
            n_head=max(1, args.hidden // 64), n_positions=2 * args.seq + 2)
        model = transformers.GPT2LMHeadModel(config)
        targets = ["c_attn", "c_proj", "c_fc"]
    return model, targets


def batches(args, device):
    """(input_ids, labels): random tokens, a separator, the same tokens again;
    only the copy is scored."""
    g = torch.Generator().manual_seed(args.seed + 1)
    sep = args.vocab - 1
    while True:
        src = torch.randint(0, args.vocab - 1, (args.batch, args.seq), generator=g)
        ids = torch.cat([src, torch.full((args.batch, 1), sep), src], dim=1)
        labels = ids.clone()
        labels[:, :args.seq + 1] = -100
        yield ids.to(device), labels.to(device)


def held_mb(model, ids, labels):
    """MB autograd keeps for backward after one forward, parameters excluded:
    saved as they are or as views (x·Wᵀ saves Wᵀ), and under FSDP2 (sharded
    DTensors outside forward) also the gathered ones, which FSDP2 frees after
    forward and gathers again for backward."""
    from torch.distributed.tensor import DTensor

    params = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
              for p in model.parameters()}
    saved = {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2 ** 20


def timed_step(model, opt, ids, labels, seed, cuda):
    """(seconds, loss) of one training step; ``seed`` is set first, so every
    variant draws the same dropout seeds."""
    torch.manual_seed(seed)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, loss.item()


def compare(runs, args, device):
    """Train ``runs`` ({"peft": model, "patched": model}, same start) on the same
    batches, steps interleaved; print loss, ms per step and memory. Returns
    (losses, memory, times), each a dict by run."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
            for k, m in runs.items()}
    data = batches(args, device)
    ids0, labels0 = next(data)
    memory = {}
    for k, m in runs.items():
        m.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            m(input_ids=ids0, labels=labels0).loss.backward()
            torch.cuda.synchronize()
            memory[k] = (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 20
            m.zero_grad(set_to_none=True)
        else:
            memory[k] = held_mb(m, ids0, labels0)
    losses = {k: [] for k in runs}
    times = {k: [] for k in runs}
    for step in range(args.steps):
        ids, labels = next(data)
        for k in (("peft", "patched") if step % 2 == 0 else ("patched", "peft")):
            seconds, loss = timed_step(runs[k], opts[k], ids, labels, args.seed + 100 + step,
                                       device.type == "cuda")
            times[k].append(seconds)
            losses[k].append(loss)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss peft {losses['peft'][-1]:.4f}  "
                  f"patched {losses['patched'][-1]:.4f}")
    what = "peak MB per step" if device.type == "cuda" else "MB held for backward"
    print(f"\n{'':8s} {'ms/step (median)':>17s} {what:>21s} {'final loss':>11s}")
    for k in runs:
        ms = statistics.median(times[k][1:] or times[k]) * 1e3
        print(f"{k:8s} {ms:17.1f} {memory[k]:21.1f} {losses[k][-1]:11.4f}")
    speed = statistics.median(times["peft"][1:] or times["peft"]) / \
        statistics.median(times["patched"][1:] or times["patched"])
    print(f"patched: {speed:.2f}x PEFT's speed, {memory['patched'] / memory['peft']:.2f}x "
          f"its memory")
    return losses, memory, times


def init_b(peft_model):
    """LoRA B starts at zero: give it a small value so both runs start from
    the same non-trivial adapter."""
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True)")
    ap.add_argument("--targets", choices=("default", "all"), default="default",
                    help="Llama: all adds gate_proj to q, k, v, o, up, down")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    device = torch.device(args.device)
    base, targets = build(args)
    base.to(device=device, dtype=getattr(torch, args.dtype))
    peft_model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                 lora_dropout=args.dropout,
                                                 target_modules=targets, use_dora=args.dora))
    init_b(peft_model)
    runs = {"peft": peft_model, "patched": copy.deepcopy(peft_model)}
    report = lora_kernels.patch_peft(runs["patched"], verbose=False)
    print(f"{args.model}: hidden {args.hidden}, {args.layers} layers, "
          f"{'DoRA' if args.dora else 'LoRA'} r={args.rank} on {len(targets)} projections, "
          f"dropout {args.dropout}, {args.dtype} on {device}; "
          f"patch_peft fused {len(report.patched)} layers, left {len(report.deferred)} to PEFT")
    return compare(runs, args, device)


if __name__ == "__main__":
    main()
