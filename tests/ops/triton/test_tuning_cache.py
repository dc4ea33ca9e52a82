"""TuningCache: tuned choices survive a new process, per device kind and version, and a bad file is ignored."""

from __future__ import annotations

import json

import pytest

from radixc.ops.triton import tuning_cache
from radixc.ops.triton.tuning_cache import TuningCache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning_cache, "cache_dir", lambda: str(tmp_path))
    return tmp_path


def test_a_new_process_reads_what_an_earlier_one_stored(cache_dir):
    TuningCache("linear").put("NVIDIA H200", "1:1024:2048:bf16", [64, 256, 4, 3])
    TuningCache("linear").put("NVIDIA H200", "16:1024:2048:bf16", "cublas")
    later = TuningCache("linear")  # a fresh instance reads the file, as a new process would
    assert later.get("NVIDIA H200", "1:1024:2048:bf16") == [64, 256, 4, 3]
    assert later.get("NVIDIA H200", "16:1024:2048:bf16") == "cublas"
    assert later.get("NVIDIA H200", "32:1024:2048:bf16") is None
    assert later.get("NVIDIA H100 80GB HBM3", "1:1024:2048:bf16") is None  # another kind of device tunes anew
    assert TuningCache("attention").get("NVIDIA H200", "1:1024:2048:bf16") is None  # another tuner
    [stored] = [p for p in (cache_dir / "radixc").iterdir() if p.name.startswith("linear")]
    assert "H200" in stored.name and "torch" in stored.name and "triton" in stored.name
    assert not [p for p in (cache_dir / "radixc").iterdir() if p.suffix == ".tmp"]


def test_an_unreadable_file_is_ignored_and_rewritten(cache_dir, caplog):
    cache = TuningCache("linear")
    path = cache.path("NVIDIA H200")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert cache.get("NVIDIA H200", "k") is None
    assert "ignoring unreadable" in caplog.text
    cache.put("NVIDIA H200", "k", "cublas")
    assert json.loads(path.read_text()) == {"k": "cublas"}


def test_a_write_that_fails_keeps_the_choice_in_this_process(cache_dir, caplog):
    (cache_dir / "radixc").write_text("a file where the directory should be")
    cache = TuningCache("linear")
    cache.put("NVIDIA H200", "k", [1, 2, 3, 4])
    assert cache.get("NVIDIA H200", "k") == [1, 2, 3, 4]
    assert "cannot write" in caplog.text
