"""What users pass as prompts and sampling params: integer numpy arrays and torch tensors run like id lists;
floats, booleans, bytes and other non-ids fail their own request with a message naming what was given; the
tokenizer loads without padding or truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from radixc.engine.llm import LLM
from radixc.engine.prompts import load_tokenizer, params_per_prompt, split_prompts, tokenize_prompts
from radixc.engine.request import SamplingParams
from radixc.models import CheckpointError

PARAMS = SamplingParams(max_new_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, compile=False, page_size=4, progress=False)


@pytest.fixture
def ids(harness) -> list[int]:
    return harness.random_prompts(1, 6, 12, seed=21)[0]


@pytest.mark.parametrize(
    "as_prompt",
    [
        lambda ids: np.array(ids, dtype=np.int64),
        lambda ids: np.array(ids, dtype=np.uint16),
        lambda ids: torch.tensor(ids, dtype=torch.int32),
        lambda ids: torch.tensor(ids),
        lambda ids: tuple(np.int32(t) for t in ids),
        lambda ids: list(torch.tensor(ids)),  # 0-d integer tensors
    ],
    ids=["numpy_int64", "numpy_uint16", "torch_int32", "torch_int64", "numpy_scalars", "0d_tensors"],
)
def test_integer_arrays_and_tensors_run_like_the_same_ids_as_a_list(harness, tiny_llama, llm, ids, as_prompt):
    expected = harness.reference_greedy(tiny_llama, ids, PARAMS.max_new_tokens)
    (alone,) = llm.generate(as_prompt(ids), PARAMS)
    batched = llm.generate([as_prompt(ids), ids], PARAMS)
    for out in (alone, *batched):
        assert out.error is None and out.prompt_token_ids == ids and out.token_ids == expected


def test_2d_integer_array_is_a_batch_of_its_rows(harness, tiny_llama, llm):
    rows = torch.tensor(harness.random_prompts(3, 7, 7, seed=22))
    outputs = llm.generate(rows.numpy(), PARAMS)
    assert [o.token_ids for o in outputs] == [
        harness.reference_greedy(tiny_llama, r, PARAMS.max_new_tokens) for r in rows.tolist()
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1.5, 2.7], "token ids must be integers, got float 1.5 at position 0"),
        ([3, 4, 5.0], "token ids must be integers, got float 5.0 at position 2"),
        ([True, False], "token ids must be integers, got bool True at position 0"),
        (b"abc", "bytes b'abc' are not token ids"),
        (bytearray(b"abc"), "bytearray b'abc' are not token ids"),
        (np.array([1.0, 2.0]), "token ids must be integers, got a numpy array of float64"),
        (np.array([True]), "token ids must be integers, got a numpy array of bool"),
        (torch.tensor([1.0, 2.0]), "token ids must be integers, got a torch tensor of torch.float32"),
        (torch.tensor([True]), "token ids must be integers, got a torch tensor of torch.bool"),
        (torch.tensor(5), "a prompt torch tensor must be 1-D, got shape []"),
        (np.ones((2, 2, 2), dtype=np.int64), "a prompt numpy array must be 1-D, got shape [2, 2, 2]"),
        ({"ids": [1, 2]}, "a prompt must be a str or a sequence of integer token ids, got dict"),
        (None, "a prompt must be a str or a sequence of integer token ids, got NoneType"),
        ([[1, 2], 3], "token ids must be integers, got list [1, 2] at position 0"),
    ],
    ids=[
        "floats",
        "a_float",
        "bools",
        "bytes",
        "bytearray",
        "numpy_float",
        "numpy_bool",
        "torch_float",
        "torch_bool",
        "0d_tensor",
        "3d_array",
        "dict",
        "none",
        "nested",
    ],
)
def test_non_integer_prompt_fails_its_request_alone_naming_what_was_given(
    harness, tiny_llama, llm, ids, bad, message
):
    outputs = llm.generate([ids, bad, ids[:4]], PARAMS)
    assert outputs[1].error is not None and message in outputs[1].error
    assert outputs[1].token_ids == [] and outputs[1].finish_reason is None
    for out, prompt in ((outputs[0], ids), (outputs[2], ids[:4])):
        assert out.error is None
        assert out.token_ids == harness.reference_greedy(tiny_llama, prompt, PARAMS.max_new_tokens)
    harness.assert_pools_empty(llm, cached_pages=llm.prefix_cache_stats().cached_pages)


def test_a_single_flat_prompt_of_numbers_is_one_request_whatever_the_number_type():
    assert split_prompts([1.5, 2.7]) == [[1.5, 2.7]]
    assert split_prompts(b"abc") == [b"abc"]
    assert split_prompts("a b") == ["a b"]
    assert split_prompts([[1, 2], "a", b"c"]) == [[1, 2], "a", b"c"]
    assert split_prompts([]) == []
    assert split_prompts(iter([[1], [2]])) == [[1], [2]]


@pytest.mark.parametrize("prompts, name", [(5, "int"), ({"a": [1]}, "dict"), (None, "NoneType")])
def test_prompts_argument_that_is_no_prompt_or_list_raises_type_error_naming_its_type(llm, prompts, name):
    with pytest.raises(TypeError, match=f"prompts must be a str, a sequence of token ids.*; got {name}$"):
        llm.generate(prompts, PARAMS)


def test_ids_outside_the_vocabulary_are_an_error_even_when_its_size_is_unknown():
    (inside, negative) = tokenize_prompts([[0, 5], [3, -1]], None, None)
    assert inside.ids == [0, 5] and inside.error is None
    assert negative.ids == [] and negative.error == "token ids [-1] are outside the vocabulary [0, ?)"
    (beyond,) = tokenize_prompts([[3, 384, 400, 384]], None, 384)
    assert beyond.error == "token ids [384, 400] are outside the vocabulary [0, 384)"


@pytest.mark.parametrize(
    "sampling_params, error, match",
    [
        ({"max_new_tokens": 3}, TypeError, r"got dict \(build one: SamplingParams\(\*\*params\)\)"),
        ("greedy", TypeError, "got str$"),
        (3, TypeError, "got int$"),
        (
            [PARAMS, {"max_new_tokens": 3}],
            TypeError,
            r"sampling_params\[1\] must be a SamplingParams, got dict",
        ),
        ([PARAMS], ValueError, "got 1 SamplingParams for 2 prompts"),
    ],
)
def test_wrong_sampling_params_name_the_type_given(llm, sampling_params, error, match):
    with pytest.raises(error, match=match):
        llm.generate([[5, 6], [7]], sampling_params)


def test_params_per_prompt_repeats_one_params_or_checks_a_list_of_them():
    assert params_per_prompt(None, 2) == [SamplingParams(), SamplingParams()]
    assert params_per_prompt(PARAMS, 3) == [PARAMS] * 3
    other = SamplingParams(max_new_tokens=2)
    assert params_per_prompt((PARAMS, other), 2) == [PARAMS, other]


def padding_tokenizer() -> Tokenizer:
    """Words "w0".."w9"; pads to 8 and truncates at 3, as many shipped tokenizer.json files do."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(10)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.enable_padding(length=8, pad_id=0, pad_token="w0")
    tokenizer.enable_truncation(max_length=3)
    return tokenizer


def test_loaded_tokenizer_never_pads_or_truncates_and_a_given_one_is_left_unchanged(tmp_path):
    given = padding_tokenizer()
    file = tmp_path / "tokenizer.json"
    given.save(str(file))
    for source in (given, file, str(file)):
        tokenizer = load_tokenizer(source)
        assert tokenizer.padding is None and tokenizer.truncation is None
        assert tokenizer.encode("w1 w2 w3 w4 w5").ids == [1, 2, 3, 4, 5]
    assert given.padding is not None and given.truncation is not None
    assert given.encode("w1 w2 w3 w4 w5").ids == [1, 2, 3, 0, 0, 0, 0, 0]
    plain = Tokenizer(models.WordLevel({"w0": 0}, unk_token="w0"))
    assert load_tokenizer(plain) is plain  # nothing to turn off: no copy


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"version": "1.0", "model": {', "unreadable tokenizer file"),
        (b"\xff\xfe\x00", "unreadable tokenizer file"),
    ],
    ids=["truncated_json", "binary"],
)
def test_unreadable_tokenizer_file_is_a_checkpoint_error_naming_it(tmp_path, content, match):
    file = tmp_path / "tokenizer.json"
    file.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(CheckpointError, match=f"^{file}: {match} \\("):
        load_tokenizer(file)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: tokenizer file not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="got int"):
        load_tokenizer(3)
