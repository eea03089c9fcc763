"""Host-side data preparation for ``step()``: pure numpy, no jax, model-independent.

The parts, in the order a call passes through them:

- :mod:`.inputs`: ``step()``'s arguments checked (every check that can reject user input, naming the argument);
- :mod:`.examples`: unpadded, truncated examples from token arrays or texts;
- :mod:`.plan`: examples into shuffled, bucketed or packed micro-batches of fixed shapes, grouped into updates;
- :mod:`.seq2seq`: the same for encoder-decoder models (T5, BART).

Callers use the names below; the modules hold them.
"""

from jaxsft.training.batching.examples import (
    Example,
    examples_from_texts,
    examples_from_tokens,
    truncation_warning,
    validate_vocab,
)
from jaxsft.training.batching.inputs import (
    STEP_KEYWORDS,
    TOKEN_KEYWORDS,
    InputTypeError,
    check_aligned,
    check_empty_call,
    check_example_weights,
    check_text_pairs,
    check_texts,
    host_array,
    is_empty,
    refuse_tokens_with_texts,
    step_inputs_of_dataset,
    token_rows,
    with_weights,
)
from jaxsft.training.batching.plan import (
    MicroBatch,
    as_packed,
    concat_padded,
    group_into_updates,
    plan_microbatches,
    segment_table,
)
from jaxsft.training.batching.seq2seq import (
    Seq2SeqExample,
    Seq2SeqMicroBatch,
    plan_seq2seq_microbatches,
    seq2seq_examples_from_texts,
    seq2seq_examples_from_tokens,
    shift_right,
)

__all__ = [
    "Example", "examples_from_texts", "examples_from_tokens", "truncation_warning", "validate_vocab",
    "STEP_KEYWORDS", "TOKEN_KEYWORDS", "InputTypeError", "check_aligned", "check_empty_call", "check_example_weights",
    "check_text_pairs", "check_texts", "host_array", "is_empty", "refuse_tokens_with_texts", "step_inputs_of_dataset",
    "token_rows", "with_weights",
    "MicroBatch", "as_packed", "concat_padded", "group_into_updates", "plan_microbatches", "segment_table",
    "Seq2SeqExample", "Seq2SeqMicroBatch", "plan_seq2seq_microbatches", "seq2seq_examples_from_texts",
    "seq2seq_examples_from_tokens", "shift_right",
]
