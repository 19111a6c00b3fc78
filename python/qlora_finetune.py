"""QLoRA: fine-tune a small Llama with a bitsandbytes 4-bit NF4 base, PEFT plain and patched.

A Llama is built from a transformers config with random weights (nothing is
downloaded), saved, and loaded back quantized with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_compute_dtype=...)`` (``--quant 8bit``: ``load_in_8bit``). PEFT LoRA
r=8 on q, k, v, o, gate, up and down (lora_dropout 0.05) is trained twice from
the same start on the synthetic copy task of ``peft_finetune.py``, once as PEFT
runs it and once after ``lora_kernels.patch_peft`` (which runs each quantized
base layer as its own module and adds the LoRA branch with the fused
``lora_delta`` op), steps interleaved. Printed: loss, ms per step and memory
(CPU: the MB autograd holds for backward after one forward; CUDA: the peak of
``torch.cuda.max_memory_allocated`` over a step).

    python python/qlora_finetune.py                           # bf16, dropout 0.05
    python python/qlora_finetune.py --dtype float32 --dropout 0   # equals PEFT
    python python/qlora_finetune.py --device cuda --hidden 2048 --layers 4
"""
import argparse
import copy
import tempfile

import torch

import lora_kernels
from peft_finetune import build, compare, init_b

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_llama(args, device):
    """The Llama of ``args``, saved and loaded back with bitsandbytes."""
    import transformers

    args.model = "llama"
    model, _ = build(args)
    dtype = getattr(torch, args.dtype)
    if args.quant == "nf4":
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=dtype)
    else:
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        del model
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=q, device_map={"": device})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", choices=("nf4", "8bit"), default="nf4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                    help="the model's dtype and the 4-bit compute dtype")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    device = torch.device(args.device)
    base = quantized_llama(args, device).train()
    peft_model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                 lora_dropout=args.dropout,
                                                 target_modules=TARGETS))
    init_b(peft_model)
    runs = {"peft": peft_model, "patched": copy.deepcopy(peft_model)}
    report = lora_kernels.patch_peft(runs["patched"], verbose=False)
    print(f"QLoRA llama ({args.quant}): hidden {args.hidden}, {args.layers} layers, "
          f"{args.batch} x {2 * args.seq + 1} tokens, r={args.rank}, dropout {args.dropout}, "
          f"{args.dtype} on {device}; patch_peft fused {len(report.patched)} of "
          f"{len(report.patched) + len(report.deferred)} LoRA layers")
    return compare(runs, args, device)


if __name__ == "__main__":
    main()
