"""Hand-written GPU kernels (Pallas Triton), each beside the XLA form it must equal.

A kernel here runs only on GPU behind a backend check; CPU and TPU take the XLA form, which is the
reference the tests compare the kernel with (in Pallas interpret mode on CPU, compiled in the GPU tier).
"""
