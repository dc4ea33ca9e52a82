"""CPU lists for --engine-cpus: parsed as taskset writes them, refused with the reason when they cannot be used;
the server process keeps the CPUs the engine does not get."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from radixc.serve.affinity import parse_cpu_list, pin_server_beside
from radixc.serve.cli import build_parser

AVAILABLE = sorted(os.sched_getaffinity(0))


def test_parses_ranges_and_lists_of_available_cpus():
    first, last = AVAILABLE[0], AVAILABLE[-1]
    assert parse_cpu_list(str(first)) == [first]
    assert parse_cpu_list(f"{last},{first}") == sorted({first, last})
    if AVAILABLE == list(range(first, last + 1)):
        assert parse_cpu_list(f"{first}-{last}") == AVAILABLE


@pytest.mark.parametrize("text", ["", "x", "1-", "0,,1", "a-b"])
def test_malformed_lists_are_refused(text):
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpu_list(text)


def test_cpus_this_process_cannot_use_are_named():
    missing = max(AVAILABLE) + 1000
    with pytest.raises(ValueError, match=rf"CPU\(s\) \[{missing}\] are not available here"):
        parse_cpu_list(f"{AVAILABLE[0]},{missing}")


def test_the_command_line_refuses_a_bad_list_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["tiny-llama", "--engine-cpus", str(max(AVAILABLE) + 1000)])
    assert exit_info.value.code == 2
    assert "are not available here" in capsys.readouterr().err


def test_the_server_keeps_the_cpus_the_engine_does_not_get():
    with mock.patch("os.sched_setaffinity") as set_affinity:
        kept = pin_server_beside(AVAILABLE[:1])
        if len(AVAILABLE) > 1:
            set_affinity.assert_called_once_with(0, AVAILABLE[1:])
            assert kept == AVAILABLE[1:]
        with mock.patch("os.sched_getaffinity", return_value=set(AVAILABLE[:1])):
            set_affinity.reset_mock()
            assert pin_server_beside(AVAILABLE[:1]) == AVAILABLE[:1]  # the engine got every CPU: shared
            set_affinity.assert_not_called()
