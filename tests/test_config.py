"""Bad configuration fails fast, naming the field and what is allowed."""

from __future__ import annotations

import pytest

from ewcstab.config import ConfigError, RunConfig


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"method": "ewc"}, r"method: 'ewc' is not allowed; allowed: fisher, mas, si, signal"),
        ({"variant": "plain"}, r"variant: 'plain' is not allowed; allowed: original, stabilized, clipped"),
        ({"arch": "resnet"}, r"arch: 'resnet' is not allowed; allowed: mlp, cnn, attention"),
        ({"lam": -1.0}, r"lam: -1.0 is not allowed; allowed: a number >= 0"),
        ({"lam": float("nan")}, r"lam: nan must be a finite number"),
        ({"lr": 0.0}, r"lr: 0.0 is not allowed; allowed: a number > 0"),
        ({"epochs": 0}, r"epochs: 0 is not allowed; allowed: an integer >= 1"),
        ({"epochs": 1.5}, r"epochs: 1.5 must be an integer"),
        ({"n_tasks": 11}, r"n_tasks: 11 is more than the 10 tasks of sequence 'permuted_mnist'"),
        ({"sequence": "split_mnist"}, r"sequence: 'split_mnist' is not allowed"),
        ({"device": "tpu"}, r"device: 'tpu' is not allowed; allowed: auto, cpu, cuda, cuda:N"),
        ({"optimizer": "rmsprop"}, r"optimizer: 'rmsprop' is not allowed; allowed: adam, sgd"),
        ({"device": 0}, r"device: 0 is not allowed; allowed: auto, cpu, cuda, cuda:N"),
        ({"data_root": 5}, r"data_root: 5 is not allowed; allowed: a folder path"),
        ({"optimizer_state": "kept"}, r"optimizer_state: 'kept' is not allowed; allowed: fresh, carried"),
        ({"chain_length": 0}, r"chain_length: 0 is not allowed; allowed: an integer >= 1"),
    ],
)
def test_invalid_values_name_field_and_allowed(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(changes)


def test_unknown_field_is_rejected_with_the_allowed_list():
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['lamda'\]; allowed fields: .*lam"):
        RunConfig.from_dict({"lamda": 3})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_file(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        RunConfig.from_file(bad)
    with pytest.raises(ConfigError, match="is a folder"):
        RunConfig.from_file(tmp_path)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("run.yaml", b"method: [mas\n", r"'.*run.yaml' is not readable as YAML: while parsing"),
        ("run.txt", b"\x89PNG\r\n\x1a\n\x00\xff", r"'.*run.txt' is not readable as YAML"),
        ("run.json", b"{method: mas}", r"'.*run.json' is not readable as JSON: Expecting property name"),
    ],
)
def test_unreadable_config_files_are_one_line_config_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        RunConfig.from_file(path)
    assert "\n" not in str(info.value)


def test_defaults_are_the_paper_protocol():
    cfg = RunConfig().resolved()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer) == (6, 100, 1e-3, "adam")
    assert (cfg.importance_samples, cfg.si_xi, cfg.alpha, cfg.fisher_label) == (5000, 0.1, 1e-3, "true")
    assert (cfg.sequence, cfg.n_tasks) == ("permuted_mnist", 10)
    assert RunConfig(arch="cnn").resolved().sequence == "mnist_fmnist_rot90"
    assert RunConfig(arch="cnn").resolved().n_tasks == 4


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: mas\nlam: 4.5\nepochs: 2\n")
    cfg = RunConfig.from_file(path)
    assert (cfg.method, cfg.lam, cfg.epochs) == ("mas", 4.5, 2)
