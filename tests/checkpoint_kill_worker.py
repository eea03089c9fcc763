"""A training process that saves checkpoints until it is killed (tests/test_checkpoint_kill.py).

It resumes from the newest complete checkpoint in ``--dir`` (if any), then loops: one step(), a save
(``keep_last=2``), and now and then a second save of the same step (the re-save swap). It prints
``saving`` before and ``saved <listing>`` after each save, so the test can time its SIGKILL into a save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    import numpy as np

    import jaxsft
    from jaxsft.infra import checkpoint as ckpt

    trainer = make_trainer(jaxsft, args.model)
    latest = ckpt.latest_checkpoint(args.dir)
    if latest is not None:
        trainer.restore_checkpoint(latest)
    print(f"resumed {trainer.state.global_step}", flush=True)
    rng = np.random.default_rng(args.seed)
    while True:
        trainer.step(input_ids=[rng.integers(3, 250, int(rng.integers(4, 15))) for _ in range(4)])
        for _ in range(1 + int(rng.random() < 0.5)):
            print("saving", flush=True)
            trainer.save_checkpoint(args.dir, keep_last=2)
            print("saved " + json.dumps(sorted(os.listdir(args.dir))), flush=True)


def make_trainer(jaxsft, model_dir: str):
    mesh = jaxsft.single_device_mesh()
    config = jaxsft.TrainConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=1000, logging_steps=1,
                                max_length=16, length_buckets=(16,), disable_tqdm=True, seed=7)
    return jaxsft.IterativeSFTTrainer(jaxsft.from_pretrained(model_dir, mesh=mesh), config, mesh=mesh)


if __name__ == "__main__":
    from xla_settings import run_torch_free

    run_torch_free()
    sys.exit(main())
