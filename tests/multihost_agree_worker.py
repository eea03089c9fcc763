"""One process of the cross-process agreement test (started by tests/test_multihost_agreement.py).

Two processes, one CPU device each, a data=2 mesh over both. In order, every process:

1. builds a trainer whose gradient_accumulation_steps differs on process 1: refused on both; the same for a
   learning rate, a config optimizer (adamw against sgd) and an optimizer transformation that differ;
2. builds the real trainer and trains one good call;
3. process 1 passes a negative token id: both processes raise ValueError naming input_ids, nothing changes;
   then an input whose len() raises RuntimeError: both raise RuntimeError, nothing changes;
4. both train a good call again (the processes stay paired: same global_step);
5. checkpoints: a save with directory=None on process 1, a restore of a missing path on process 1, a save
   on process 0 while process 1 calls step(): refused on both each time; a good save and restore pass;
6. process 1 dies (os._exit); process 0's next step(), save_checkpoint() and restore_checkpoint() raise
   TimeoutError within agreement_timeout_s, and process 0 then ends normally (the test checks exit code 0).

Results go to ``--out/agree{pid}.json``. Imports no jax at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from xla_settings import child_flags

TIMEOUT_S = 8.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = child_flags(os.environ.get("XLA_FLAGS", ""), devices=1)
    import jax

    import jaxsft

    pid = args.process_id
    jaxsft.infra.distributed.initialize(coordinator_address=args.coordinator, num_processes=2, process_id=pid)
    mesh = jaxsft.make_mesh(2, 1, 1)
    model = jaxsft.from_pretrained(args.model, mesh=mesh)
    report: dict = {}

    def config(**overrides):
        settings = dict(learning_rate=1e-3, per_device_train_batch_size=2, logging_steps=1, max_length=16,
                        length_buckets=(16,), disable_tqdm=True, seed=1, agreement_timeout_s=TIMEOUT_S)
        return jaxsft.TrainConfig(**{**settings, **overrides})

    def attempt(name, fn):
        try:
            fn()
            report[name] = None
        except Exception as err:  # recorded and compared by the test
            report[name] = [type(err).__name__, isinstance(err, ValueError), str(err)]

    attempt("mismatch", lambda: jaxsft.IterativeSFTTrainer(
        model, config(gradient_accumulation_steps=1 + pid), mesh=mesh))
    attempt("lr_mismatch", lambda: jaxsft.IterativeSFTTrainer(model, config(learning_rate=1e-3 * 10**pid), mesh=mesh))
    attempt("optim_mismatch", lambda: jaxsft.IterativeSFTTrainer(
        model, config(optim=("adamw", "sgd")[pid]), mesh=mesh))
    import optax

    attempt("transformation_mismatch", lambda: jaxsft.IterativeSFTTrainer(
        model, config(), mesh=mesh, optimizer=(optax.adamw(1e-3), optax.sgd(1e-3))[pid]))
    trainer = jaxsft.IterativeSFTTrainer(model, config(), mesh=mesh)
    rng = np.random.default_rng(pid)
    good = lambda: [rng.integers(3, 200, 8) for _ in range(2)]  # noqa: E731
    trainer.step(input_ids=good())
    before = [np.asarray(x.addressable_shards[0].data).copy() for x in jax.tree.leaves(trainer.params)]
    bad = [np.array([5, -7, 9])] + good()[:1] if pid == 1 else good()
    attempt("bad_input", lambda: trainer.step(input_ids=bad))
    after = [np.asarray(x.addressable_shards[0].data) for x in jax.tree.leaves(trainer.params)]
    report["unchanged_after_bad_input"] = all(np.array_equal(a, b) for a, b in zip(before, after))
    report["step_after_bad_input"] = trainer.state.global_step

    class LengthExplodes(list):
        def __len__(self):
            raise RuntimeError("this input cannot tell its length")

    attempt("runtime_input", lambda: trainer.step(input_ids=LengthExplodes(good()) if pid == 1 else good()))
    after = [np.asarray(x.addressable_shards[0].data) for x in jax.tree.leaves(trainer.params)]
    report["unchanged_after_runtime_input"] = all(np.array_equal(a, b) for a, b in zip(before, after))
    trainer.step(input_ids=good())
    report["step_after_retry"] = trainer.state.global_step

    ckpt_dir = str(Path(args.out, "checkpoints"))
    attempt("save_none", lambda: trainer.save_checkpoint(None if pid == 1 else ckpt_dir))
    saved = trainer.save_checkpoint(ckpt_dir)
    attempt("restore_missing", lambda: trainer.restore_checkpoint(saved if pid == 0 else saved + "-missing"))
    attempt("save_vs_step", lambda: trainer.save_checkpoint(ckpt_dir) if pid == 0 else trainer.step(input_ids=good()))
    trainer.restore_checkpoint(saved)
    report["step_after_checkpoints"] = trainer.state.global_step
    if pid == 1:
        Path(args.out, "agree1.json").write_text(json.dumps(report))
        os._exit(0)  # dies without a word to its peer
    for name, call in (("dead_peer", lambda: trainer.step(input_ids=good())),
                       ("dead_peer_save", lambda: trainer.save_checkpoint(ckpt_dir)),
                       ("dead_peer_restore", lambda: trainer.restore_checkpoint(saved))):
        started = time.monotonic()
        attempt(name, call)
        report[f"{name}_seconds"] = time.monotonic() - started
    report["step_after_dead_peer"] = trainer.state.global_step
    Path(args.out, "agree0.json").write_text(json.dumps(report))
    # A normal end: the test checks exit code 0 (the runtime's shutdown barrier used to abort the survivor).


if __name__ == "__main__":
    from xla_settings import run_torch_free

    run_torch_free()
    main()
