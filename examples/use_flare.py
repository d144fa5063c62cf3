"""Use FLARE in your own training code: a tiny Llama built from config, no downloads."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from flare_exp.flare import FlareConfig, get_flare_model

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
base = LlamaForCausalLM(config)

# Stage 1: a LoRA fine-tuned on English (here: untrained, for brevity).
stage1 = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

# Stage 2: a fresh FLARE adapter on top (the stage-1 LoRA is merged; kept frozen on 4-bit).
flare = get_flare_model(stage1, FlareConfig(fusion="add_relu", target_modules="all-linear"))
optimizer = torch.optim.AdamW([p for p in flare.parameters() if p.requires_grad], lr=1e-2)

target = torch.randint(3, 64, (4, 12))   # target-language input ids: prompt (8) + answer (4)
source = torch.randint(3, 64, (4, 9))    # the English version of the same prompts
# Loss on the answer only: -100 marks the prompt, and FLARE aligns the prompt with the English
# (answer tokens fuse the last English position, as every generated token does).
labels = target.masked_fill(torch.arange(12) < 8, -100)
batch = dict(input_ids=target, attention_mask=torch.ones_like(target), labels=labels,
             source_input_ids=source, source_attention_mask=torch.ones_like(source))

flare.train()
for step in range(20):
    loss = flare(**batch).loss            # source pass (no grad) + fused target pass
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.3f}")

flare.eval()
generated = flare.generate(input_ids=target[:, :8], source_input_ids=source, max_new_tokens=4,
                           do_sample=False, pad_token_id=0)
print("generated:", generated[:, 8:].tolist(), " trained answers:", target[:, 8:].tolist())

# flare_config.json + adapter_model.safetensors; load_flare_model(stage1_model, path) restores it
# on a freshly loaded stage-1 model (get_flare_model changes the model it is given, as PEFT does).
flare.save_pretrained("outputs/example_flare")
