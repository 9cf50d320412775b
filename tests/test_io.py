"""Atomic result files: complete or absent, NaN refused, and readable as the umask allows."""

from __future__ import annotations

import math
import os
import stat

import pytest

from ewcstab.io import read_json, write_json_atomic, write_text_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_results_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_text_atomic(tmp_path / "a" / "table.csv", "x\n")
    write_json_atomic(tmp_path / "a" / "run.json", {"x": 1})
    for name in ("table.csv", "run.json"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~mask  # the folder too


def test_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"acc": 0.5})
    write_json_atomic(target, {"acc": 0.9})
    assert read_json(target) == {"acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_nan_is_refused_and_the_old_file_kept(tmp_path):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"acc": 0.5})
    with pytest.raises(ValueError):
        write_json_atomic(target, {"acc": math.nan})
    assert read_json(target) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
