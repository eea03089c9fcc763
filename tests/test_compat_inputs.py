"""compat.inputs.convert_step_inputs: every accepted input form, and every bad input with its message."""

from __future__ import annotations

import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from compat.inputs import BOTH_INPUTS_WARNING, StepInputs, StepInputTypeError, convert_step_inputs

IDS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
MASK = [[1, 1, 1], [1, 0], [1, 1, 1, 0]]
LABELS = [[-100, 6, 7], [8, -100], [10, 11, 12, -100]]


class FakeColumn:
    """What datasets 4 returns for ds["col"]: sliceable and sized, but not a list."""

    def __init__(self, rows):
        self._rows = rows

    def __getitem__(self, key):
        return self._rows[key]

    def __len__(self):
        return len(self._rows)


def assert_rows(rows, expected):
    assert isinstance(rows, list) and len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert isinstance(row, np.ndarray) and row.dtype == np.int32 and row.ndim == 1
        assert row.tolist() == list(want)


FORMS = {
    "list_of_lists": lambda rows: [list(r) for r in rows],
    "tuple_of_tuples": lambda rows: tuple(tuple(r) for r in rows),
    "list_of_torch": lambda rows: [torch.tensor(r) for r in rows],
    "list_of_numpy": lambda rows: [np.asarray(r, dtype=np.int64) for r in rows],
    "list_of_jax": lambda rows: [jnp.asarray(r) for r in rows],
    "fake_column": lambda rows: FakeColumn([torch.tensor(r) for r in rows]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_ragged_token_forms(form):
    make = FORMS[form]
    out = convert_step_inputs(input_ids=make(IDS), attention_mask=make(MASK), labels=make(LABELS))
    assert_rows(out.input_ids, IDS)
    assert_rows(out.attention_mask, MASK)
    assert_rows(out.labels, LABELS)
    assert out.texts is None and out.texts_labels is None


SQUARE = [[5, 6, 7], [8, 9, 0]]
SQUARE_MASK = [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize(
    "make",
    [
        lambda r: torch.tensor(r),
        lambda r: torch.tensor(r, dtype=torch.int32),
        lambda r: np.asarray(r),
        lambda r: jnp.asarray(r),
        lambda r: FakeColumn(torch.tensor(r)),
    ],
    ids=["torch_2d", "torch_int32", "numpy_2d", "jax_2d", "column_of_2d"],
)
def test_two_d_forms(make):
    out = convert_step_inputs(input_ids=make(SQUARE), attention_mask=make(SQUARE_MASK))
    assert_rows(out.input_ids, SQUARE)
    assert_rows(out.attention_mask, SQUARE_MASK)
    assert out.labels is None


def test_numpy_object_array_of_rows():
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.array([1, 2, 3]), np.array([4])
    assert_rows(convert_step_inputs(input_ids=ragged).input_ids, [[1, 2, 3], [4]])


def test_real_datasets_column():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": IDS, "attention_mask": MASK})
    ds.set_format("torch")
    out = convert_step_inputs(input_ids=ds["input_ids"], attention_mask=ds["attention_mask"])
    assert_rows(out.input_ids, IDS)
    assert_rows(out.attention_mask, MASK)


def test_bool_mask_and_grad_tensors():
    ids = [torch.tensor([1, 2, 3], dtype=torch.long)]
    mask = [torch.tensor([True, True, False])]
    weights = torch.nn.Parameter(torch.ones(3))
    labels = [(weights.detach() * 0 + torch.tensor([1.0, 2.0, 3.0])).long().requires_grad_(False)]
    out = convert_step_inputs(input_ids=ids, attention_mask=mask, labels=labels)
    assert_rows(out.attention_mask, [[1, 1, 0]])
    assert_rows(out.labels, [[1, 2, 3]])


def test_labels_are_optional():
    out = convert_step_inputs(input_ids=[torch.tensor([1, 2, 3])])
    assert out.labels is None and out.attention_mask is None


def test_texts():
    out = convert_step_inputs(texts=["a b", "c"], texts_labels=["d", "e f"])
    assert out == StepInputs(texts=["a b", "c"], texts_labels=["d", "e f"])
    assert convert_step_inputs(texts=FakeColumn(["x", "y"])).texts == ["x", "y"]
    assert convert_step_inputs(texts=("x",)).texts == ["x"]


def test_as_kwargs_matches_core_step_signature():
    kwargs = convert_step_inputs(texts=["a"]).as_kwargs()
    assert kwargs == {"input_ids": None, "attention_mask": None, "labels": None, "texts": ["a"], "texts_labels": None}


def test_nothing_is_mutated_or_aliased():
    ids_np = np.asarray(SQUARE)
    ids_list = [list(r) for r in IDS]
    torch_rows = [torch.tensor(r) for r in IDS]
    out_np = convert_step_inputs(input_ids=ids_np)
    out_list = convert_step_inputs(input_ids=ids_list)
    out_torch = convert_step_inputs(input_ids=torch_rows)
    for out in (out_np, out_list, out_torch):
        for row in out.input_ids:
            row[...] = -1
    assert ids_np.tolist() == SQUARE
    assert ids_list == IDS
    assert [t.tolist() for t in torch_rows] == IDS
    texts = ["a", "b"]
    assert convert_step_inputs(texts=texts).texts is not texts


# --- TRL's checks, in TRL's order, with TRL's messages --------------------------------------------


def test_no_inputs_is_trls_error():
    with pytest.raises(ValueError, match=re.escape("Step should include `input_ids` or `texts` as keyword arguments.")):
        convert_step_inputs(labels=[[1]])


def test_both_inputs_warns_and_texts_win():
    with pytest.warns(UserWarning) as record:
        out = convert_step_inputs(input_ids=[[1, 2]], texts=["a"])
    assert str(record[0].message) == BOTH_INPUTS_WARNING
    assert out.texts == ["a"] and out.input_ids is None


def test_token_arguments_beside_texts_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"attention_mask and labels given together with `texts` are ignored"):
        out = convert_step_inputs(texts=["a"], attention_mask=[[1]], labels=[[1]])
    assert out.labels is None


def test_texts_labels_without_texts_warns():
    with pytest.warns(UserWarning, match=r"`texts_labels` is ignored without `texts`"):
        out = convert_step_inputs(input_ids=[[1, 2]], texts_labels=["a"])
    assert out.texts_labels is None


def test_encoder_decoder_needs_labels():
    message = (
        "No 'labels' or 'text_labels' are provided. When using an encoder-decoder architecture, "
        "'labels' or 'text_labels' must be passed."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_step_inputs(input_ids=[[1, 2]], is_encoder_decoder=True)
    out = convert_step_inputs(input_ids=[[1, 2]], labels=[[3, 4]], is_encoder_decoder=True)
    assert_rows(out.labels, [[3, 4]])


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"texts": "one string"}, re.escape("'text' must be a list of strings - got <class 'str'>; pass texts=[...]")),
        ({"texts": ["a", 3]}, "Elements in 'text' must be strings - got <class 'int'>"),
        ({"texts": ["a"], "texts_labels": "b"}, "'text_labels' must be a list of strings - got <class 'str'>"),
        ({"texts": ["a"], "texts_labels": [None]}, "Elements in 'text_labels' must be strings - got <class 'NoneType'>"),
        ({"input_ids": {"a": 1}}, "input_ids must be a list of tensors - got <class 'dict'>; pass input_ids as"),
        ({"input_ids": "hello"}, "input_ids must be a list of tensors - got <class 'str'>"),
        ({"input_ids": [1, 2, 3]}, "Elements in input_ids must be tensors - got <class 'int'>; .*wrap a single example"),
        ({"input_ids": [{"x": 1}]}, "Elements in input_ids must be tensors - got <class 'dict'>"),
        ({"input_ids": [[1.0, 2.0]]}, r"input_ids\[0\] holds float 1.0; token ids and masks must be integers"),
        ({"input_ids": [torch.tensor([1.0, 2.0])]}, r"input_ids\[0\] has dtype float32; token ids must be integers"),
        ({"input_ids": torch.ones(2, 3)}, r"input_ids\[0\] has dtype float32"),
        ({"input_ids": [torch.tensor([1, 2]).bfloat16()]}, r"input_ids\[0\] has dtype bfloat16"),
        ({"input_ids": [torch.tensor([True, False])]}, r"input_ids\[0\] has dtype bool; token ids must be integers"),
        ({"input_ids": [[1, 2]], "labels": [np.array([1.5, 2.0])]}, r"labels\[0\] has dtype float64"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1.0, 1.0]]}, r"attention_mask\[0\] holds float 1.0"),
    ],
)
def test_type_errors(kwargs, pattern):
    with pytest.raises(StepInputTypeError, match=pattern) as err:
        convert_step_inputs(**kwargs)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)  # TRL raised ValueError


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"input_ids": [[1], []]}, r"input_ids\[1\] is empty; every example needs at least one token"),
        ({"input_ids": torch.tensor([1, 2, 3])}, r"input_ids is a 1-D array of shape \(3,\); .*wrap a single example"),
        ({"input_ids": np.zeros((1, 2, 3), dtype=int)}, r"input_ids is a 3-D array"),
        ({"input_ids": [np.zeros((2, 2), dtype=int)]}, r"input_ids\[0\] has shape \(2, 2\); each example must be 1-D"),
        ({"input_ids": [[1, -2]]}, r"input_ids\[0\] contains negative token ids"),
        ({"input_ids": [[1, 2**40]]}, r"input_ids\[0\] holds values outside int32"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}, r"attention_mask\[0\] contains \[2\]; masks must be 0"),
        ({"input_ids": [[1, 2]], "labels": [[-5, 2]]}, r"labels\[0\] contains negative values other than -100"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 1], [1]]},
         r"attention_mask has 2 examples but input_ids has 1; pass one per example"),
        ({"input_ids": [[1, 2]], "labels": [[1, 2, 3]]}, r"labels\[0\] has length 3 but input_ids\[0\] has 2"),
        ({"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1, 1]]}, r"attention_mask\[1\] has length 2"),
        ({"texts": ["a", "b"], "texts_labels": ["c"]}, r"texts_labels has 1 strings but texts has 2"),
    ],
)
def test_value_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        convert_step_inputs(**kwargs)


def test_no_warnings_on_the_happy_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_step_inputs(input_ids=[[1, 2]], attention_mask=[[1, 1]], labels=[[1, 2]])
        convert_step_inputs(texts=["a"], texts_labels=["b"])


@pytest.mark.parametrize("kwargs", [
    {"input_ids": []}, {"input_ids": torch.zeros(0, 3, dtype=torch.long)}, {"texts": []},
    {"input_ids": [], "labels": []}, {"texts": [], "texts_labels": []},
])
def test_no_examples_is_passed_on_as_an_empty_round(kwargs):
    """The facade's empty step() is the core's warned no-op (issue 27): converted, not refused."""
    out = convert_step_inputs(**kwargs)
    primary = out.texts if "texts" in kwargs else out.input_ids
    assert primary == []
