"""requirements.txt (pip, CI) and envs/*.yaml (conda) pin the same versions."""

from __future__ import annotations

import re

import yaml

from conftest import REPO

# conda-forge package names that differ from PyPI's
CONDA_TO_PIP = {"pyyaml": "pyyaml"}


def pip_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def conda_pins(path) -> dict[str, str]:
    pins = {}
    for dep in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", spec)
                if m:
                    pins[m.group(1).lower()] = m.group(2)
        else:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)=(\S+)", dep)
            if m and m.group(1) != "python":
                pins[CONDA_TO_PIP.get(m.group(1), m.group(1)).lower()] = m.group(2)
    return pins


def test_every_conda_pin_matches_requirements():
    pip = pip_pins()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs, "no conda environments in envs/"
    for env in envs:
        pins = conda_pins(env)
        assert pins, f"{env.name} pins nothing"
        for name, version in pins.items():
            assert name in pip, f"{env.name} pins {name}, which requirements.txt does not"
            assert pip[name] == version, f"{env.name}: {name}={version}, requirements.txt: {pip[name]}"


def test_all_requirements_are_exact_pins():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", line), f"not an exact pin: {line}"


def test_dev_env_covers_the_workflow_packages():
    pins = conda_pins(REPO / "envs" / "dev.yaml")
    for name in ("snakemake", "torch", "torchvision", "optuna", "pandas", "seaborn", "jupyter"):
        assert name in pins
