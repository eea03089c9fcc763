"""The command-line application's parts: the demo, the bundled tasks and the bundled SmolLM2 model."""
