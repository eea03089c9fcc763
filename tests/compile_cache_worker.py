"""A fresh process for tests/test_compile_cache.py: one trainer, one step and one greedy generate, on a cache folder
given on the command line; prints a JSON line of what the cache did (jax.monitoring's events), the step's losses
and the generated tokens."""

import json
import sys

import jax
import numpy as np
from transformers import LlamaConfig

import jaxsft
import tiny
from jaxsft.models.families import spec_from_hf_config

mode, folder, scratch = sys.argv[1], sys.argv[2], sys.argv[3]
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the tiny programs compile in well under 1 s
events: dict[str, int] = {}
jax.monitoring.register_event_listener(lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))

spec = spec_from_hf_config(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
model = jaxsft.init_model(spec, mesh=jaxsft.single_device_mesh(), seed=0)
events.clear()  # the cache counts from the trainer on
config = dict(learning_rate=1e-3, per_device_train_batch_size=4, max_length=32, disable_tqdm=True, logging_steps=0)
if mode == "off":
    config["compilation_cache"] = False
elif mode != "default":
    config["compilation_cache_dir"] = folder
try:
    tokenizer = tiny.load_tokenizer(tiny.tokenizer_dir(scratch))
    trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(**config), tokenizer)
except ValueError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(0)
rng = np.random.default_rng(0)
stats = trainer.step(input_ids=[rng.integers(3, 300, size=int(n)) for n in rng.integers(5, 30, size=8)])
generated = trainer.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=6, temperature=0.0, return_tokens=True)
print(json.dumps({
    "cache_dir": jaxsft.infra.compile_cache.in_use(), "hits": events.get("/jax/compilation_cache/cache_hits", 0),
    "misses": events.get("/jax/compilation_cache/cache_misses", 0), "programs": stats["compiled_shapes"],
    "update_losses": stats["update_losses"], "generated": [list(map(int, t)) for t in generated.tokens],
}))
