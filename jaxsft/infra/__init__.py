"""Infrastructure both sides stand on: the config, meshes and sharding, multi-process agreement, checkpoints,
metrics sinks, XLA options, fingerprints, atomic folders, the optional torch bridge and small shared helpers."""
