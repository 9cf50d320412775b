"""The command line: help without heavy imports, one line for every user error (nothing written), the
commands the workflow calls, and real runs writing records."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ewcstab.cli import build_parser, main
from ewcstab.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def ewcstab(*argv: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ewcstab", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_run_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--variant", "--lam", "--seed", "--out", "--tasks", "--epochs", "--train-subset",
                 "--device", "--optimizer-state", "--chain-length"):
        assert flag in out
    assert "--engine" not in out


def test_building_the_parser_imports_no_heavy_library():
    """`ewcstab --help` and argument errors answer at once: no torch, pandas or optuna behind them."""
    code = ("import sys; from ewcstab.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'optuna', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    proc = ewcstab("--help")
    assert proc.returncode == 0 and "search-summary" in proc.stdout


def test_commands_and_flags_the_workflow_uses_exist(capsys):
    """Every `ewcstab COMMAND` in workflow/rules is a command; every flag there is one of its commands'."""
    rules = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    used = set(re.findall(r'"ewcstab ([a-z-]+)', rules))
    assert {"run", "run-batched", "search", "search-summary", "gather", "table", "prune"} <= used
    helps = []
    for command in sorted(used | {"benchmark", "benchmark-batched"}):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        helps.append(capsys.readouterr())
        assert info.value.code == (2 if command.startswith("benchmark") else 0), (command, helps[-1].err)
    known = set(re.findall(r"--[a-z][a-z-]*", "".join(h.out for h in helps)))
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rules)) - {"--report", "--sdm"}  # snakemake's
    assert flags <= known, flags - known


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "foo"], "method: 'foo' is not allowed; allowed: fisher, mas, si, signal"),
        (["--lam", "-2"], "lam: -2.0 is not allowed"),
        (["--device", "gpu"], "device: 'gpu' is not allowed"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["--optimizer-state", "kept"], "optimizer_state: 'kept' is not allowed; allowed: fresh, carried"),
        (["--chain-length", "0"], "chain_length: 0 is not allowed"),
    ],
)
def test_invalid_values_exit_2_with_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["run", "--out", str(tmp_path / "r.json"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------------- one line per user error
def _unwritable_dir(tmp: Path) -> str:
    """A folder no file can be created in, root or not."""
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return str(locked)
    if Path("/proc/self").is_dir():
        return "/proc"
    pytest.skip("no folder here that root cannot write")


STUDY = ["--low", "0.1", "--high", "10", "--n-trials", "2", "--method", "mas"]


def search(storage: str = "sqlite:///s/study.db", *more: str) -> list[str]:
    return ["search", *STUDY, "--storage", storage, "--runs-dir", "s/runs", *more]


#: name -> (files to create first {path: content}, argv, words the one line holds, paths that must not exist).
#: Paths are relative to the probe's own folder; "{locked}" is a folder nobody can write in.
PROBES = {
    "out is a folder": ({"d/keep": ""}, ["run", "--out", "d"], ["out: 'd' is a folder"], []),
    "out under a regular file": ({"f": "x"}, ["run", "--out", "f/r.json"], ["'f' is a file, not a folder"],
                                 ["f/r.json"]),
    "out not writable": ({}, ["run", "--out", "{locked}/r.json"], ["not writable"], ["{locked}/r.json"]),
    "search --out without --trials-out": ({}, search("sqlite:///s/study.db", "--out", "best.json"), ["trials-out"],
                                          ["best.json", "s"]),
    "run-batched duplicate outputs": ({}, ["run-batched", "--seeds", "0", "1", "--out", "a.json", "a.json"],
                                      ["out: 'a.json' is given twice"], ["a.json"]),
    "threads -3": ({}, ["run", "--threads", "-3", "--out", "r.json"], ["--threads: -3 is not allowed"], ["r.json"]),
    "threads 0": ({}, ["run", "--threads", "0", "--out", "r.json"], ["--threads: 0 is not allowed"], ["r.json"]),
    "runs-per-batch 0": ({}, ["run-batched", "--runs-per-batch", "0", "--out", "r.json"],
                         ["--runs-per-batch: 0 is not allowed"], ["r.json"]),
    "heartbeat -5": ({}, search("sqlite:///s/study.db", "--heartbeat", "-5"), ["--heartbeat: -5 is not allowed"], ["s"]),
    "negative grid value": ({}, search("sqlite:///s/study.db", "--mode", "grid", "--grid", "-1", "2"),
                            ["grid: -1.0 is not allowed"], ["s"]),
    "grid without grid mode": ({}, search("sqlite:///s/study.db", "--grid", "1", "2"), ["--grid needs --mode grid"], ["s"]),
    "lam-from holds a string": ({"best.json": '{"best_lambda": "4.5"}'},
                                ["run", "--lam-from", "best.json", "--out", "r.json"],
                                ["lam-from: 'best.json'", "'4.5'"], ["r.json"]),
    "lam-from not JSON": ({"best.json": "best_lambda = 4"}, ["run", "--lam-from", "best.json", "--out", "r.json"],
                          ["lam-from: 'best.json' is not JSON"], ["r.json"]),
    "config not YAML": ({"c.yaml": "method: [mas\n"}, ["run", "--config", "c.yaml", "--out", "r.json"],
                        ["'c.yaml' is not readable as YAML"], ["r.json"]),
    "config device: 0": ({"c.yaml": "device: 0\n"}, ["run", "--config", "c.yaml", "--out", "r.json"],
                         ["device: 0 is not allowed"], ["r.json"]),
    "config data_root: 5": ({"c.yaml": "data_root: 5\n"}, ["run", "--config", "c.yaml", "--out", "r.json"],
                            ["data_root: 5 is not allowed"], ["r.json"]),
    "storage URL malformed": ({}, search("sqlite:/s/study.db"),
                              ["storage: 'sqlite:/s/study.db' is not a storage URL"], ["s"]),
    "storage URL of no database": ({}, search("nosuchdb://host/x", "--device", "cpu"), ["storage: cannot open 'nosuchdb://host/x'"], ["s"]),
    "search-summary of a missing study": ({}, ["search-summary", *STUDY, "--storage", "sqlite:///s/study.db", "--out", "b.json", "--trials-out", "t.csv"],
                                          ["no file 's/study.db'"], ["s", "b.json", "t.csv"]),
    "gather a missing record": ({}, ["gather", "--final", "nope.json", "--out", "g.csv"],
                                ["nope.json: cannot be read"], ["g.csv"]),
    "table of a missing CSV": ({"best.json": '{"best_lambda": 1}'},
                               ["table", "--runs", "nope.csv", "--search", "best.json", "--csv-out", "t.csv",
                                "--md-out", "t.md"], ["runs: 'nope.csv' does not exist"], ["t.csv", "t.md"]),
    "explosion-gather of a non-JSON record": ({"r.json": "{"}, ["explosion-gather", "--records", "r.json",
                                                                "--out", "e.csv"], ["records: 'r.json' is not JSON"],
                                              ["e.csv"]),
    "prune-summary of a missing input": ({}, ["prune-summary", "--inputs", "n.csv", "--curves-out", "c.csv"],
                                         ["inputs: 'n.csv' does not exist"], ["c.csv"]),
    "prune --out named .json": ({}, ["prune", "--out", "p.json"], ["must not end in .json"], ["p.json"]),
    "missing required flag": ({}, ["run", "--method", "mas"], ["the following arguments are required: --out"], []),
    "unknown flag": ({}, ["run", "--out", "r.json", "--lamda", "3"], ["unrecognized arguments: --lamda"], ["r.json"]),
}


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, list[str]]]:
    """Every probe, run as its own `python -m ewcstab` process (two at a time) in a folder of its own."""
    root = tmp_path_factory.mktemp("probes")
    locked = _unwritable_dir(root)

    def one(name: str):
        files, argv, _, absent = PROBES[name]
        work = root / re.sub(r"\W+", "_", name)
        work.mkdir()
        for rel, content in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(content)
        argv = [a.replace("{locked}", locked) for a in argv]
        return name, (ewcstab(*argv, cwd=work), work, [a.replace("{locked}", locked) for a in absent])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, PROBES))


@pytest.mark.parametrize("name", list(PROBES))
def test_user_errors_are_one_line_and_write_nothing(name, probe_results):
    proc, work, absent = probe_results[name]
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    for word in PROBES[name][2]:
        assert word in err, err
    for rel in absent:
        assert not (work / rel).exists(), f"{rel} was written"


def test_cuda_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = ewcstab("run", "--device", "cuda", "--out", "r.json", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "device: 'cuda' was asked for, but torch sees no CUDA device" in proc.stderr
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------------------------- real runs
def test_console_script_runs_and_writes_record(data_root, tmp_path):
    out = tmp_path / "run.json"
    cfg = tmp_path / "quick.yaml"
    cfg.write_text("train_subset: 500\ntest_subset: 300\nimportance_samples: 200\n")
    proc = ewcstab("run", "--config", str(cfg), "--method", "fisher", "--lam", "10", "--tasks", "2", "--epochs",
                   "1", "--device", "cpu", "--data-root", str(data_root), "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["config"]["method"] == "fisher" and rec["config"]["lam"] == 10.0
    assert rec["config"]["train_subset"] == 500  # from --config, kept
    assert len(rec["acc_matrix"]) == 2 and rec["diverged"] is False


def test_run_batched_command_writes_one_record_per_run(data_root, tmp_path):
    outs = [tmp_path / f"seed{s}_lam{lam}.json" for s in (0, 1) for lam in (0.0, 20.0)]
    quick = ["--method", "mas", "--tasks", "2", "--epochs", "1", "--test-subset", "200", "--importance-samples",
             "100", "--device", "cpu", "--data-root", str(data_root), "--no-progress"]
    assert main(["run-batched", *quick, "--train-subset", "500", "--seeds", "0", "1", "--lams", "0", "20",
                 "--out", *map(str, outs)]) == 0
    recs = [json.loads(p.read_text()) for p in outs]
    assert [(r["seed"], r["config"]["lam"]) for r in recs] == [(0, 0.0), (0, 20.0), (1, 0.0), (1, 20.0)]
    assert all(len(r["acc_matrix"]) == 2 and r["batch"]["runs"] == 4 for r in recs)
    # the workflow's form: lambda from a search result, several seeds
    best = tmp_path / "best_lambda.json"
    best.write_text(json.dumps({"best_lambda": 3.5}))
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    assert main(["run-batched", *quick, "--train-subset", "300", "--seeds", "3", "4", "--lam-from", str(best),
                 "--out", *map(str, outs)]) == 0
    assert [(json.loads(p.read_text())["seed"], json.loads(p.read_text())["config"]["lam"]) for p in outs] == [
        (3, 3.5), (4, 3.5)]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lams", "1", "--lam-from", "best.json", "--out", "x.json"], "either --lams or --lam-from"),
        (["--seeds", "0", "1", "--out", "a.json"], r"out: 1 file\(s\) given for 2 runs"),
    ],
)
def test_run_batched_refuses_mismatched_outputs(argv, message, tmp_path, monkeypatch):
    from ewcstab.cli.run import cmd_run_batched

    monkeypatch.chdir(tmp_path)
    (tmp_path / "best.json").write_text('{"best_lambda": 1}')
    with pytest.raises(ConfigError, match=message):
        cmd_run_batched(build_parser().parse_args(["run-batched", *argv]))
