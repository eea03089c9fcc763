"""jaxsft.training.batching: example construction, validation, micro-batch planning."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsft.training.batching import (
    Example,
    MicroBatch,
    examples_from_texts,
    examples_from_tokens,
    group_into_updates,
    plan_microbatches,
    validate_vocab,
)

PAD = 0  # also used as the EOS id in these tests, as many tokenizers do


def _tok(input_ids, attention_mask=None, labels=None, max_length=None, mode="keep_end"):
    return examples_from_tokens(input_ids, attention_mask, labels, max_length=max_length, truncation_mode=mode)


def _ids(examples):
    return [ex.input_ids.tolist() for ex in examples]


def _labels(examples):
    return [ex.labels.tolist() for ex in examples]


# --- examples_from_tokens ----------------------------------------------------


def test_labels_default_to_ids_and_dtype_is_int32():
    examples = _tok([[5, 6, 7], np.array([8, 9], np.int64)])
    assert _ids(examples) == [[5, 6, 7], [8, 9]]
    assert _labels(examples) == [[5, 6, 7], [8, 9]]
    for ex in examples:
        assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32


def test_right_padding_dropped_by_mask_but_eos_equal_to_pad_is_kept_and_learned():
    ids = np.array([[5, 6, PAD, PAD, PAD], [7, 8, 9, 10, PAD]])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # row 0 ends with a real EOS (= pad id)
    examples = _tok(ids, mask)
    assert _ids(examples) == [[5, 6, PAD], [7, 8, 9, 10, PAD]]
    assert _labels(examples) == [[5, 6, PAD], [7, 8, 9, 10, PAD]]


def test_left_padding_and_mask_holes_are_dropped():
    ids = np.array([[PAD, PAD, 5, 6], [7, 3, 8, 9]])
    mask = np.array([[0, 0, 1, 1], [1, 0, 1, 1]], dtype=bool)  # bool masks are accepted
    assert _ids(_tok(ids, mask)) == [[5, 6], [7, 8, 9]]


def test_given_labels_are_honoured_and_follow_the_mask():
    ids = [[PAD, 5, 6, 7]]
    mask = [[0, 1, 1, 1]]
    labels = [[11, -100, 6, 7]]
    (ex,) = _tok(ids, mask, labels)
    assert ex.input_ids.tolist() == [5, 6, 7]
    assert ex.labels.tolist() == [-100, 6, 7]


@pytest.mark.parametrize(
    "mode, ids, labels",
    [("keep_end", [4, 5, 6], [-100, 5, 6]), ("keep_start", [1, 2, 3], [1, -100, 3])],
)
def test_truncation_cuts_the_sequence_axis(mode, ids, labels):
    examples = _tok([[1, 2, 3, 4, 5, 6], [7, 8]], labels=[[1, -100, 3, -100, 5, 6], [7, 8]], max_length=3, mode=mode)
    assert len(examples) == 2  # the batch axis is never cut
    assert _ids(examples) == [ids, [7, 8]]
    assert _labels(examples) == [labels, [7, 8]]


def test_truncation_happens_after_masking():
    ids = [[PAD, PAD, PAD, 1, 2, 3]]
    mask = [[0, 0, 0, 1, 1, 1]]
    assert _ids(_tok(ids, mask, max_length=3, mode="keep_start")) == [[1, 2, 3]]


def test_no_max_length_means_no_truncation():
    assert _ids(_tok([list(range(1, 100))])) == [list(range(1, 100))]


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(input_ids=[]), ValueError, r"input_ids is empty"),
        (dict(input_ids=np.array([1, 2, 3])), TypeError, r"input_ids .*1-D array.*Wrap a single example"),
        (dict(input_ids="hello"), TypeError, r"input_ids must be a list"),
        (dict(input_ids=[[1, 2]], attention_mask=[[1, 1], [1, 1]]), ValueError, r"attention_mask has 2 examples but input_ids has 1"),
        (dict(input_ids=[[1, 2]], labels=[[1, 2], [1]]), ValueError, r"labels has 2 examples but input_ids has 1"),
        (dict(input_ids=[[1, 2]], labels=[[1]]), ValueError, r"labels\[0\] has length 1 but input_ids\[0\] has length 2"),
        (dict(input_ids=[[1, 2]], attention_mask=[[1]]), ValueError, r"attention_mask\[0\] has length 1"),
        (dict(input_ids=[[1, 2], [1.0, 2.0]]), TypeError, r"input_ids\[1\] has dtype float64.*integers"),
        (dict(input_ids=[[True, False]]), TypeError, r"input_ids\[0\] has dtype bool"),
        (dict(input_ids=[[1, 2]], labels=[[1.5, 2.0]]), TypeError, r"labels\[0\] has dtype float64"),
        (dict(input_ids=[[1, 2]], attention_mask=[[1, 2]]), ValueError, r"attention_mask\[0\] contains 2.*0 \(padding\) or 1"),
        (dict(input_ids=[[1, -3]]), ValueError, r"input_ids\[0\] contains the negative id -3"),
        (dict(input_ids=[[1, 2]], labels=[[1, -5]]), ValueError, r"labels\[0\] contains -5"),
        (dict(input_ids=[[1, 2]], labels=[[-101, 2]]), ValueError, r"labels\[0\] contains -101"),
        (dict(input_ids=[[1, 2], [3, 4]], attention_mask=[[1, 1], [0, 0]]), ValueError, r"input_ids\[1\] is empty after"),
        (dict(input_ids=[[1, 2], []]), ValueError, r"input_ids\[1\] is empty"),
        (dict(input_ids=[[[1, 2]]]), ValueError, r"input_ids\[0\] must be a 1-D sequence"),
        (dict(input_ids=[[1, 2]], truncation_mode="middle"), ValueError, r"truncation_mode must be either"),
        (dict(input_ids=[[1, 2]], max_length=0), ValueError, r"max_length=0"),
    ],
)
def test_examples_from_tokens_rejects_bad_input(kwargs, error, pattern):
    kwargs = {"max_length": None, "truncation_mode": "keep_end", **kwargs}
    with pytest.raises(error, match=pattern):
        examples_from_tokens(**kwargs)


def test_validate_vocab_names_argument_index_and_value():
    examples = _tok([[1, 2], [3, 4]], labels=[[1, -100], [3, 4]])
    validate_vocab(examples, vocab_size=5)  # in range: no error
    with pytest.raises(ValueError, match=r"input_ids\[1\] contains the id 4.*4 entries"):
        validate_vocab(examples, vocab_size=4)
    bad_label = [Example(np.array([1, 2], np.int32), np.array([-100, 9], np.int32))]
    with pytest.raises(ValueError, match=r"labels\[0\] contains the id 9"):
        validate_vocab(bad_label, vocab_size=5)


# --- examples_from_texts -------------------------------------------------------


class CountingTokenizer:
    """A real HF fast tokenizer (word level, BOS template) that counts its calls."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        words = ["<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
        vocab = {w: i for i, w in enumerate(words)}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        self.hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        self.vocab = vocab
        self.calls = []

    def __call__(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        return self.hf(texts, **kwargs)


def test_texts_without_labels_learn_every_token_with_default_special_tokens():
    tok = CountingTokenizer()
    v = tok.vocab
    examples = examples_from_texts(tok, ["the cat sat", "a dog"], max_length=None, truncation_mode="keep_end")
    assert _ids(examples) == [[1, v["the"], v["cat"], v["sat"]], [1, v["a"], v["dog"]]]
    assert _labels(examples) == _ids(examples)
    assert len(tok.calls) == 1 and tok.calls[0][0] == ["the cat sat", "a dog"]


def test_texts_labels_are_appended_without_bos_and_only_they_are_learned():
    tok = CountingTokenizer()
    v = tok.vocab
    examples = examples_from_texts(
        tok, ["the cat", "a dog"], ["sat on the mat", "ran"], max_length=None, truncation_mode="keep_end"
    )
    assert _ids(examples) == [
        [1, v["the"], v["cat"], v["sat"], v["on"], v["the"], v["mat"]],
        [1, v["a"], v["dog"], v["ran"]],
    ]
    assert _labels(examples) == [
        [-100, -100, -100, v["sat"], v["on"], v["the"], v["mat"]],
        [-100, -100, -100, v["ran"]],
    ]
    # one batched call per list; completions without special tokens
    assert [c[0] for c in tok.calls] == [["the cat", "a dog"], ["sat on the mat", "ran"]]
    assert tok.calls[1][1].get("add_special_tokens") is False


def test_texts_are_truncated_like_tokens():
    tok = CountingTokenizer()
    v = tok.vocab
    (ex,) = examples_from_texts(tok, ["the cat"], ["sat on the mat"], max_length=3, truncation_mode="keep_end")
    assert ex.input_ids.tolist() == [v["on"], v["the"], v["mat"]]
    assert ex.labels.tolist() == [v["on"], v["the"], v["mat"]]
    (ex,) = examples_from_texts(tok, ["the cat"], ["sat on the mat"], max_length=3, truncation_mode="keep_start")
    assert ex.labels.tolist() == [-100, -100, -100]


@pytest.mark.parametrize(
    "tokenizer_given, texts, texts_labels, error, pattern",
    [
        (False, ["a"], None, ValueError, r"no tokenizer"),
        (True, "the cat", None, TypeError, r"texts must be a list of str"),
        (True, [], None, ValueError, r"texts is empty"),
        (True, ["a", 3], None, TypeError, r"texts\[1\] is a int"),
        (True, ["a", "dog"], ["ran"], ValueError, r"texts_labels has 1 entries but texts has 2"),
        (True, ["a"], "ran", TypeError, r"texts_labels must be a list of str"),
    ],
)
def test_examples_from_texts_rejects_bad_input(tokenizer_given, texts, texts_labels, error, pattern):
    tok = CountingTokenizer() if tokenizer_given else None
    with pytest.raises(error, match=pattern):
        examples_from_texts(tok, texts, texts_labels, max_length=None, truncation_mode="keep_end")


# --- plan_microbatches / group_into_updates -------------------------------------


def _numbered(lengths):
    """Example i has tokens [i+1]*length so it can be recognised after shuffling."""
    return [Example(np.full(n, i + 1, np.int32), np.full(n, i + 1, np.int32)) for i, n in enumerate(lengths)]


def test_plan_uses_one_permutation_and_consecutive_groups():
    lengths = [3, 9, 2, 17, 5, 4, 1]
    examples = _numbered(lengths)
    rng = np.random.default_rng(123)
    batches = plan_microbatches(examples, rows=3, buckets=(4, 8, 16, 32), rng=rng)
    ref = np.random.default_rng(123)
    perm = ref.permutation(len(examples))
    assert rng.integers(1 << 30) == ref.integers(1 << 30)  # exactly one draw consumed
    got = [int(row[0]) - 1 for b in batches for row in b.input_ids[: b.num_examples]]
    assert got == perm.tolist()
    assert [b.num_examples for b in batches] == [3, 3, 1]
    for b, start in zip(batches, range(0, 7, 3)):
        longest = max(lengths[i] for i in perm[start : start + 3])
        expected = min(x for x in (4, 8, 16, 32) if x >= longest)
        assert b.input_ids.shape == b.attention_mask.shape == b.labels.shape == (3, expected)
        assert b.input_ids.dtype == b.attention_mask.dtype == b.labels.dtype == np.int32


def test_plan_pads_right_and_fills_short_groups_with_zero_weight_rows():
    examples = [
        Example(np.array([5, 6, 7], np.int32), np.array([5, 6, 7], np.int32)),
        Example(np.array([8, 9], np.int32), np.array([-100, 9], np.int32)),
    ]
    (b,) = plan_microbatches(examples, rows=4, buckets=(4, 8), rng=np.random.default_rng(0), shuffle=False)
    assert isinstance(b, MicroBatch)
    np.testing.assert_array_equal(b.input_ids, [[5, 6, 7, 0], [8, 9, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(
        b.labels, [[5, 6, 7, -100], [-100, 9, -100, -100], [-100] * 4, [-100] * 4]
    )
    assert b.num_examples == 2
    # shifted targets: row 0 -> 6, 7 (5 at position 0 is never predicted); row 1 -> 9
    assert b.num_label_tokens == 3


def test_plan_without_shuffle_keeps_order_and_leaves_rng_alone():
    examples = _numbered([2, 2, 2, 2])
    rng = np.random.default_rng(7)
    batches = plan_microbatches(examples, rows=2, buckets=(2,), rng=rng, shuffle=False)
    assert [int(r[0]) for b in batches for r in b.input_ids] == [1, 2, 3, 4]
    assert rng.integers(1 << 30) == np.random.default_rng(7).integers(1 << 30)


def test_plan_rejects_example_longer_than_largest_bucket():
    with pytest.raises(ValueError, match=r"9 tokens but the largest length bucket is 8"):
        plan_microbatches(_numbered([9]), rows=1, buckets=(4, 8), rng=np.random.default_rng(0))


@pytest.mark.parametrize("rows, buckets", [(0, (4,)), (2, ()), (2, (8, 4))])
def test_plan_rejects_bad_rows_or_buckets(rows, buckets):
    with pytest.raises(ValueError):
        plan_microbatches(_numbered([2]), rows=rows, buckets=buckets, rng=np.random.default_rng(0))


def test_group_into_updates_keeps_leftover_group():
    batches = plan_microbatches(_numbered([2] * 7), rows=1, buckets=(2,), rng=np.random.default_rng(0), shuffle=False)
    updates = group_into_updates(batches, 3)
    assert [len(u) for u in updates] == [3, 3, 1]
    assert [int(b.input_ids[0, 0]) for u in updates for b in u] == list(range(1, 8))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        group_into_updates(batches, 0)


def test_default_buckets_pad_a_sequence_by_less_than_half():
    """The default buckets put three halves of each power of two between them: any length pads by less than half
    (powers of two alone padded 33 tokens to 64), and a generate-filter-train loop's 128 + 256-token sequences
    train at 384, plain or packed, not at 512."""
    from jaxsft import TrainConfig
    from jaxsft.training.batching.plan import bucket_for

    config = TrainConfig(max_length=4096)
    buckets, row_lengths = config.buckets(), config.packed_row_lengths()
    assert buckets[:6] == (32, 48, 64, 96, 128, 192) and buckets[-1] == 4096
    assert all(bucket_for(n, buckets) < 1.5 * n for n in range(32, 4097))
    rng = np.random.default_rng(0)
    examples = [Example(np.full(384, 5, np.int32), np.full(384, 5, np.int32)) for _ in range(8)]
    for pack in (False, True):
        (b,) = plan_microbatches(examples, rows=8, buckets=buckets, rng=rng, pack=pack, longer_rows=pack,
                                 row_lengths=row_lengths)
        assert b.input_ids.shape == (8, 384) and not b.packed, (pack, b.input_ids.shape)


def test_packed_rows_take_only_the_octave_lengths():
    """Packed rows vary their count as well as their length, so they take only the power-of-two buckets (and
    max_length): the midpoints would multiply the shapes a ragged loop compiles. Here three examples of 300 tokens
    would fill two rows of 768 (1,536 tokens) but take two rows of 1,024: still fewer than 8 plain rows of 384."""
    from jaxsft import TrainConfig

    config = TrainConfig(max_length=4096)
    row_lengths = config.packed_row_lengths()
    assert row_lengths == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    examples = [Example(np.full(n, 5, np.int32), np.full(n, 5, np.int32)) for n in (300, 300, 300, 200, 200)]
    plan = dict(rows=8, buckets=config.buckets(), rng=np.random.default_rng(0), pack=True, longer_rows=True)
    (b,) = plan_microbatches(examples, row_lengths=row_lengths, **plan)
    assert b.packed and b.input_ids.shape[1] in row_lengths and b.input_ids.size < 8 * 384
    (every,) = plan_microbatches(examples, **plan)  # without the subset, any bucket
    assert every.packed and every.input_ids.shape[1] not in row_lengths
