"""Run records are checked before they are counted: a truncated, foreign or misplaced record, or one run
gathered twice, stops `gather` with one line naming the file, so no table is built from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ewcstab.aggregate import gather_records, load_record, load_records, path_axes
from ewcstab.errors import DataError


def record(arch="mlp", method="mas", variant="original", lam=4.5, seed=1, **config) -> dict:
    """A run record with the keys ewcstab.records.run_record writes (two tasks)."""
    cfg = {"arch": arch, "sequence": "permuted_mnist", "method": method, "variant": variant, "lam": lam,
           "seed": seed, "n_tasks": 2, **config}
    return {"schema": "ewcstab.run/1", "config": cfg, "seed": seed, "tasks": ["mnist", "mnist_perm2"],
            "acc_matrix": [[0.97], [0.95, 0.96]], "mean_acc_after_task": [0.97, 0.955], "final_mean_acc": 0.955,
            "diverged": False, "diverged_at": None, "train_seconds": [1.0, 1.0], "provenance": {}}


def write(root: Path, rel: str, rec: dict) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    """results/runs with mas and fisher (original) at seeds 0 and 1, and two baselines."""
    root = tmp_path / "results" / "runs"
    for method, lam in (("mas", 4.5), ("fisher", 41.0)):
        for seed in (0, 1):
            write(root, f"mlp/{method}/original/seed{seed}.json", record(method=method, lam=lam, seed=seed))
    for seed in (0, 1):
        write(root, f"mlp/baseline/seed{seed}.json", record(method="fisher", lam=0.0, seed=seed))
    return root


def finals(root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob("mlp/*/original/seed*.json"))


def test_good_records_are_gathered(runs):
    df = gather_records(finals(runs), "final")
    assert len(df) == 4 * 2 and set(df.method) == {"mas", "fisher"} and set(df.optimizer_state) == {"fresh"}
    base = gather_records(sorted(str(p) for p in runs.glob("mlp/baseline/*.json")), "baseline")
    assert set(base.lam) == {0.0}


def test_a_record_copied_over_another_refuses_the_table(runs):
    """fisher/original/seed1.json copied over mas/original/seed1.json: named, one line."""
    victim = runs / "mlp/mas/original/seed1.json"
    shutil.copy(runs / "mlp/fisher/original/seed1.json", victim)
    with pytest.raises(DataError) as info:
        gather_records(finals(runs), "final")
    message = str(info.value)
    assert message.startswith(f"{victim}: the record's method is 'fisher' but its path says 'mas'")
    assert "\n" not in message


def test_the_gather_command_reports_it_in_one_line(runs, tmp_path, capsys):
    from ewcstab.cli import main

    shutil.copy(runs / "mlp/fisher/original/seed1.json", runs / "mlp/mas/original/seed1.json")
    out = tmp_path / "continual_runs.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["gather", "--final", *finals(runs), "--out", str(out)])
    assert exit_info.value.code != 0 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlp/mas/original/seed1.json" in err[0], err


@pytest.mark.parametrize("cut", [0, 1, 200])
def test_a_truncated_record_names_its_file(runs, cut):
    path = runs / "mlp/mas/original/seed0.json"
    path.write_text(path.read_text()[:cut])
    with pytest.raises(DataError, match=f"^{path}: not a complete JSON run record"):
        gather_records(finals(runs), "final")


@pytest.mark.parametrize("change,needle", [
    (lambda r: r.pop("schema"), "not a run record (schema None"),
    (lambda r: r.update(schema="ewcstab.pruning/1"), "not a run record (schema 'ewcstab.pruning/1'"),
    (lambda r: r.pop("acc_matrix"), "run record without acc_matrix"),
    (lambda r: r["config"].pop("variant"), "run record without config.variant"),
    (lambda r: r.update(seed=7), "seed 7 but its config says seed 0"),
    (lambda r: r["config"].update(arch="cnn"), "the record's arch is 'cnn' but its path says 'mlp'"),
])
def test_schema_and_identity_checks(runs, change, needle):
    path = runs / "mlp/mas/original/seed0.json"
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))
    with pytest.raises(DataError) as info:
        load_record(path)
    assert str(info.value).startswith(str(path)) and needle in str(info.value), info.value


def test_a_baseline_must_have_lambda_zero(runs):
    path = write(runs, "mlp/baseline/seed0.json", record(lam=4.5, seed=0))
    with pytest.raises(DataError, match="the record's lam is 4.5 but its path says 0.0"):
        load_record(path)


def test_each_run_is_counted_once(runs, tmp_path):
    copy = write(tmp_path / "elsewhere" / "runs", "mlp/mas/original/seed1.json", record(seed=1))
    with pytest.raises(DataError, match=f"^{copy}: the same run as .*mlp/mas/original/seed1.json"):
        load_records([*finals(runs), str(copy)], "final")
    with pytest.raises(DataError, match="the same run as"):  # the same file twice
        load_records([finals(runs)[0]] * 2, "final")


def test_optimizer_state_is_part_of_the_identity(tmp_path):
    """Older records without optimizer_state are fresh; a path naming the state must agree with the record."""
    root = tmp_path / "runs"
    fresh = write(root, "mlp/mas/original/fresh/seed1.json", record())
    carried = write(root, "mlp/mas/original/carried/seed1.json", record(optimizer_state="carried"))
    assert len(load_records([str(fresh), str(carried)], "final")) == 2
    wrong = write(root, "mlp/mas/stabilized/carried/seed1.json", record(variant="stabilized"))
    with pytest.raises(DataError, match="the record's optimizer_state is 'fresh' but its path says 'carried'"):
        load_record(wrong)


def test_path_axes_read_only_the_run_folders():
    assert path_axes("/home/mlp/results/runs/cnn/mas/stabilized/seed12.json") == {
        "seed": 12, "variant": "stabilized", "method": "mas", "arch": "cnn"}
    assert path_axes("results/runs/mlp/baseline/seed0.json") == {"seed": 0, "lam": 0.0, "arch": "mlp"}
    assert path_axes("results/explosion/attention/fisher/clipped/sgd/lam1e+05/seed2.json") == {
        "seed": 2, "lam": 1e5, "optimizer": "sgd", "variant": "clipped", "method": "fisher", "arch": "attention"}
    assert path_axes("results/search/mlp/si/original/runs/trial3_seed1001.json") == {"seed": 1001}
    assert path_axes("run.json") == {}
