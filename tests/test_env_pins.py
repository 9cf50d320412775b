"""requirements.txt (pip, CI), envs/*.yaml and the linux-64 pin file (conda) pin the same versions; the
workflow's conda environment is created for real where conda or mamba is installed (opt-in, downloads)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, copy_workflow

# conda-forge package names that differ from PyPI's
CONDA_TO_PIP = {"pytorch": "torch"}
PIN_FILE = REPO / "envs" / "ewcstab.linux-64.pin.txt"


def pip_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def conda_spec(spec: str) -> tuple[str, str] | None:
    """(PyPI name, version) of a conda spec `name=version[=build]`; None for an unpinned name or python."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)=([^=\s]+)(?:=\S+)?", spec)
    if not m or m.group(1) == "python":
        return None
    return CONDA_TO_PIP.get(m.group(1), m.group(1)).lower(), m.group(2)


def conda_pins(path) -> dict[str, str]:
    pins = {}
    for dep in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", spec)
                if m:
                    pins[m.group(1).lower()] = m.group(2)
        elif pinned := conda_spec(dep):
            pins[pinned[0]] = pinned[1]
    return pins


def pin_file_pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in PIN_FILE.read_text().splitlines()]
    return dict(p for line in lines if line and (p := conda_spec(line)))


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


def test_the_pin_file_freezes_the_rule_env_at_the_same_versions():
    """Snakemake reads envs/<env>.<platform>.pin.txt beside the env file; it must pin what the YAML does."""
    assert PIN_FILE.name == "ewcstab.linux-64.pin.txt" and (REPO / "envs" / "ewcstab.yaml").exists()
    assert pin_file_pins() == conda_pins(REPO / "envs" / "ewcstab.yaml")


def test_torch_comes_from_conda_forge_in_the_rule_env():
    env = yaml.safe_load((REPO / "envs" / "ewcstab.yaml").read_text())
    assert env["channels"][0] == "conda-forge"
    assert {"pytorch=2.14.1", "torchvision=0.29.1"} <= set(d for d in env["dependencies"] if isinstance(d, str))
    pip_sections = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert not pip_sections, "no pip section: the post-deploy script installs ewcstab"


def test_all_requirements_are_exact_pins():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", line), f"not an exact pin: {line}"


def test_dev_env_covers_the_workflow_packages():
    pins = conda_pins(REPO / "envs" / "dev.yaml")
    for name in ("snakemake", "torch", "torchvision", "optuna", "pandas", "seaborn", "jupyter"):
        assert name in pins


def test_post_deploy_installs_from_the_workflow_folder(tmp_path):
    """Not from the current directory: Snakemake runs the script wherever its working directory is."""
    script = (REPO / "envs" / "ewcstab.post-deploy.sh").read_text()
    assert '"$EWCSTAB_WORKFLOW_DIR"' in script and "install --no-deps -e ." not in script
    proc = subprocess.run(["bash", str(REPO / "envs" / "ewcstab.post-deploy.sh")], cwd=tmp_path, text=True,
                          capture_output=True, env={k: v for k, v in os.environ.items() if k != "EWCSTAB_WORKFLOW_DIR"})
    assert proc.returncode != 0 and "EWCSTAB_WORKFLOW_DIR" in proc.stderr


CONDA = shutil.which("mamba") or shutil.which("conda")


@pytest.mark.conda
@pytest.mark.skipif(CONDA is None, reason="neither conda nor mamba is on PATH: the conda route is not tested here")
def test_snakemake_creates_the_conda_env(tmp_path):
    """`snakemake --sdm conda --conda-create-envs-only` from another working directory: the env holds the pinned
    torch and this checkout's ewcstab."""
    work = copy_workflow(tmp_path / "wf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--sdm", "conda", "--conda-create-envs-only", "--cores", "1",
         "--snakefile", str(work / "Snakefile"), "--directory", str(elsewhere), "--conda-prefix",
         str(tmp_path / "envs"), "--configfile", str(work / "config" / "quick.yaml")],
        capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (env,) = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
    check = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import ewcstab, torch; print(ewcstab.__file__, torch.__version__)"],
        capture_output=True, text=True, timeout=300)
    location, version = check.stdout.split()
    assert location.startswith(str(work)) and version.startswith("2.14.1"), check.stdout + check.stderr
