"""Move a LoRA adapter between PEFT and lora_kernels, both ways.

1. A small Llama (random weights from a config) gets a PEFT LoRA adapter,
   which PEFT saves with ``save_pretrained``.
2. ``lora_kernels.load_adapter`` loads it into a fresh copy of the base model
   (injecting lora_kernels layers from the adapter's config); the logits
   match PEFT's.
3. The lora_kernels model trains a few steps and ``save_adapter`` writes it
   in PEFT's format; ``PeftModel.from_pretrained`` loads it and gives the
   lora_kernels model's logits.

    python python/convert_adapter.py [--out DIR]
"""
import argparse
import copy
import tempfile

import torch

import lora_kernels


def tiny_llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for the two adapters (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        peft_dir, ours_dir = f"{out}/peft_adapter", f"{out}/lora_kernels_adapter"

        # 1. PEFT trains nothing here, but its B starts non-zero so the adapter matters.
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "up_proj", "down_proj", "gate_proj"]))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        peft_model.save_pretrained(peft_dir)
        with torch.no_grad():
            peft_logits = peft_model(input_ids=ids).logits

        # 2. PEFT → lora_kernels.
        ours = copy.deepcopy(base)
        loaded = lora_kernels.load_adapter(ours, peft_dir)
        ours.eval()
        with torch.no_grad():
            diff_in = (ours(input_ids=ids).logits - peft_logits).abs().max().item()
        print(f"PEFT -> lora_kernels: {len(loaded.layers)} LoRA layers loaded, "
              f"max |logits difference| {diff_in:.2e}")

        # 3. Train the lora_kernels model, then lora_kernels → PEFT.
        ours.train()
        opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(args.steps):
            loss = ours(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        ours.eval()
        lora_kernels.save_adapter(ours, ours_dir)
        back = PeftModel.from_pretrained(copy.deepcopy(base), ours_dir).eval()
        with torch.no_grad():
            diff_out = (back(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max()
        print(f"lora_kernels -> PEFT after {args.steps} steps (loss {loss.item():.4f}): "
              f"max |logits difference| {diff_out.item():.2e}")
    return diff_in, diff_out.item()


if __name__ == "__main__":
    main()
