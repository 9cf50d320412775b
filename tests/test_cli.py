"""The command line: help, validation messages, and a real run writing a record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ewcstab.cli import main


def test_help_lists_the_run_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--variant", "--lam", "--seed", "--out", "--tasks", "--epochs", "--train-subset", "--device"):
        assert flag in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "foo"], "method: 'foo' is not allowed; allowed: fisher, mas, si, signal"),
        (["--lam", "-2"], "lam: -2.0 is not allowed"),
        (["--device", "gpu"], "device: 'gpu' is not allowed"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    ],
)
def test_invalid_values_exit_2_with_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["run", "--out", str(tmp_path / "r.json"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_console_script_runs_and_writes_record(data_root, tmp_path):
    out = tmp_path / "run.json"
    cfg = tmp_path / "quick.yaml"
    cfg.write_text("train_subset: 500\ntest_subset: 300\nimportance_samples: 200\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ewcstab.cli", "run", "--config", str(cfg), "--method", "fisher", "--lam", "10",
         "--tasks", "2", "--epochs", "1", "--device", "cpu", "--data-root", str(data_root), "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["config"]["method"] == "fisher" and rec["config"]["lam"] == 10.0
    assert rec["config"]["train_subset"] == 500  # from --config, kept
    assert len(rec["acc_matrix"]) == 2 and rec["diverged"] is False
