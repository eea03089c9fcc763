"""The training side: the trainer and its programs, state and logs; what is trained (objectives, step, loss);
how inputs become micro-batches (batching); the optimizer and schedule builders (optim)."""
