"""Infrastructure both sides stand on: the config, meshes and sharding, multi-process agreement, checkpoints,
metrics sinks, XLA options, fingerprints, atomic folders, the optional torch bridge and small shared helpers."""


def __getattr__(name: str):  # submodules on first use, so importing this package stays light (no JAX)
    from jaxsft.infra.lazy import submodule

    return submodule(__name__, name)
