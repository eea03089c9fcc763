"""The training side: the trainer and its programs, state and logs; what is trained (objectives, step, loss);
how inputs become micro-batches (batching); the optimizer and schedule builders (optim)."""


def __getattr__(name: str):  # submodules on first use, so importing this package stays light (no JAX)
    from jaxsft.infra.lazy import submodule

    return submodule(__name__, name)
