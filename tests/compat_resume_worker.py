"""The second half of tests/test_compat_checkpoints.py's resume test, in a fresh process.

Builds the facade from the same model folder and arguments, restores ``--checkpoint``, makes calls
``--first`` .. ``--last`` of the shared call sequence, and writes the final weights (npz) and the
log history (json) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--checkpoint", "--out", "--output-dir"):
        parser.add_argument(name, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--last", type=int, required=True)
    args = parser.parse_args()
    import numpy as np

    import test_compat_checkpoints as shared

    trainer = shared.build(args.model, args.output_dir)
    trainer.restore_checkpoint(args.checkpoint)
    for i in range(args.first, args.last + 1):
        trainer.step(input_ids=shared.call(i))
    weights = {k: v.detach().numpy() for k, v in trainer.model.state_dict().items()}
    np.savez(os.path.join(args.out, "weights.npz"), **weights)
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    sys.exit(main())
