"""Fine-tune a small Llama with PEFT LoRA, sharded with FSDP2, on several processes.

    torchrun --nproc-per-node 2 python/fsdp_finetune.py            # patched vs plain PEFT
    torchrun --nproc-per-node 2 python/fsdp_finetune.py --plain    # PEFT unpatched only
    torchrun --nproc-per-node 8 python/fsdp_finetune.py --hidden 2048 --layers 8 --dtype bfloat16

The model is built from a transformers config with random weights (nothing
is downloaded) and learns a synthetic task: copy a random sequence after a
separator token. PEFT LoRA (r=8 on q, k, v, o, gate, up, down, lora_dropout
0.05) is put on it, ``lora_kernels.patch_peft`` fuses its layers, and each
decoder layer and the whole model are sharded with ``fully_shard`` (with
``--dtype bfloat16``: a MixedPrecisionPolicy of bf16 parameters and fp32
gradient reduction). The process group is gloo on CPUs and nccl on GPUs,
chosen from the device. Each rank trains on its slice of the global batch.

By default the same start is trained twice, steps interleaved: as PEFT runs
it (``peft``) and patched (``patched``); ``--plain`` or ``--patched`` runs one
of them. Printed per rank: loss, time per step (median), and memory: on the
CPU the bytes autograd holds for backward after one forward (activations;
parameters, sharded or gathered, are not counted), on CUDA the peak of
``torch.cuda.max_memory_allocated`` over a step. Rank 0 then writes the
patched model's adapter (or the plain one's) in PEFT's format to ``--out``
(``lora_kernels.save_adapter``: every rank calls it, the tensors are
gathered, rank 0 writes), loadable with ``PeftModel.from_pretrained``.
"""
import argparse
import copy
import os
import statistics

import torch
import torch.distributed as dist

import lora_kernels
from peft_finetune import held_mb, timed_step  # python/ is on a script's path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    import transformers

    torch.manual_seed(args.seed)  # the same weights on every rank
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=2 * args.seq + 2)
    return transformers.LlamaForCausalLM(config)


def batches(args, device):
    """This rank's slice of each global batch: random tokens, a separator,
    the same tokens again; only the copy is scored."""
    g = torch.Generator().manual_seed(args.seed + 1)  # the same batches on every rank
    sep = args.vocab - 1
    per_rank = args.batch // dist.get_world_size()
    lo = dist.get_rank() * per_rank
    while True:
        src = torch.randint(0, args.vocab - 1, (args.batch, args.seq), generator=g)
        ids = torch.cat([src, torch.full((args.batch, 1), sep), src], dim=1)
        labels = ids.clone()
        labels[:, :args.seq + 1] = -100
        yield ids[lo:lo + per_rank].to(device), labels[lo:lo + per_rank].to(device)


def shard(model, args):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if args.dtype == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def peak_mb(model, ids, labels):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(input_ids=ids, labels=labels).loss.backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated() - start) / 2 ** 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--plain", action="store_true", help="PEFT unpatched only")
    which.add_argument("--patched", action="store_true", help="patched only")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over ranks)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: FSDP2 mixed precision (bf16 parameters, fp32 reduction)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", default="fsdp_adapter", help="where rank 0 writes the adapter")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch: got {args.batch}, expected a multiple of the "
                         f"{world} processes")

    peft_model = get_peft_model(build(args).to(device), LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
        target_modules=TARGETS))
    # LoRA B starts at zero: give it a small value so both runs start from
    # the same non-trivial adapter.
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    names = ["peft"] if args.plain else ["patched"] if args.patched else ["peft", "patched"]
    runs = {k: copy.deepcopy(peft_model) for k in names}
    del peft_model
    report = None
    if "patched" in runs:
        report = lora_kernels.patch_peft(runs["patched"], verbose=False)
    for m in runs.values():
        shard(m, args)
    if rank == 0:
        fused = f"; patch_peft fused {len(report.patched)} of " \
                f"{len(report.patched) + len(report.deferred)} LoRA layers" if report else ""
        print(f"llama: hidden {args.hidden}, {args.layers} layers, r={args.rank}, dropout "
              f"{args.dropout}, {args.dtype}, FSDP2 over {world} processes "
              f"({dist.get_backend()}, {device.type}), global batch {args.batch} × "
              f"{2 * args.seq + 1} tokens{fused}", flush=True)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
            for k, m in runs.items()}
    data = batches(args, device)
    ids0, labels0 = next(data)
    memory = {k: (peak_mb if cuda else held_mb)(m, ids0, labels0) for k, m in runs.items()}
    losses = {k: [] for k in runs}
    times = {k: [] for k in runs}
    for step in range(args.steps):
        ids, labels = next(data)
        for k in (names if step % 2 == 0 else names[::-1]):
            seconds, loss = timed_step(runs[k], opts[k], ids, labels, args.seed + 100 + step,
                                       cuda)
            times[k].append(seconds)
            losses[k].append(loss)
        if rank == 0 and (step % max(1, args.steps // 5) == 0 or step == args.steps - 1):
            print(f"step {step:4d}  " + "  ".join(f"loss {k} {losses[k][-1]:.4f}" for k in names),
                  flush=True)

    mine = {k: (statistics.median(times[k][1:] or times[k]) * 1e3, memory[k], losses[k][-1])
            for k in names}
    table = [None] * world
    dist.all_gather_object(table, mine)
    if rank == 0:
        what = "peak MB per step" if cuda else "MB held for backward"
        print(f"\n{'rank':>4s} {'':8s} {'ms/step (median)':>17s} {what:>21s} "
              f"{'last loss (its slice)':>22s}")
        for r, rows in enumerate(table):
            for k, (ms, mb, last) in rows.items():
                print(f"{r:4d} {k:8s} {ms:17.1f} {mb:21.1f} {last:22.4f}")
        if len(names) == 2:
            speed = statistics.median(rows["peft"][0] for rows in table) / \
                statistics.median(rows["patched"][0] for rows in table)
            mem = sum(rows["patched"][1] for rows in table) / \
                sum(rows["peft"][1] for rows in table)
            print(f"patched: {speed:.2f}x PEFT's speed, {mem:.2f}x its memory")

    lora_kernels.save_adapter(runs[names[-1]], args.out)  # every rank; rank 0 writes
    if rank == 0:
        print(f"adapter of '{names[-1]}' saved to {args.out}/ (PEFT's format)", flush=True)
    dist.destroy_process_group()
    return losses, memory, times


if __name__ == "__main__":
    main()
