"""Rejection-sampling fine-tuning on your own data (``python -m jaxsft rft``, :mod:`jaxsft.rft.loop`); the demo
(:mod:`jaxsft.rft.demo`) is the same loop on a bundled task (:mod:`jaxsft.rft.tasks`) and the bundled SmolLM2
(:mod:`jaxsft.rft.bundled`)."""

from jaxsft.rft.data import DataError, Example, load_jsonl
from jaxsft.rft.loop import RFTConfig, RunInterrupted, run
from jaxsft.rft.verifiers import VerifierError, get_verifier

__all__ = ["DataError", "Example", "RFTConfig", "RunInterrupted", "VerifierError", "get_verifier", "load_jsonl", "run"]
