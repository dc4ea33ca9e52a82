"""SamplingParams are checked on construction; a bad field raises a ValueError naming it."""

from __future__ import annotations

import pytest

from radixc.engine.request import SamplingParams


def test_defaults_are_greedy_sixteen_tokens_and_stop_ids_become_a_tuple():
    params = SamplingParams(stop_token_ids=[3, 4])
    assert params.greedy and params.max_new_tokens == 16 and params.stop_token_ids == (3, 4)
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.0),
        ("max_new_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", 0),
        ("top_k", -2),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("seed", 1.5),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", "12"),
        ("ignore_eos", 1),
    ],
)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
