"""The workflow through a real SLURM: a one-node cluster on this machine, profiles/slurm, sbatch.

`.ci/slurm/up.sh` installs Debian's slurm-wlm, munge, slurmdbd and mariadb-server when they are
missing and starts munged, a private MariaDB, slurmdbd, slurmctld and slurmd with their state in a
temporary folder (docs/cluster.md, "The SLURM test"); `.ci/slurm/down.sh` stops them again in a
finalizer. The workflow then runs with `--profile profiles/slurm` on the quick config with
tests/workflow_tiny.yaml and a one-study, one-seed layer on top (Table 1 and every stage before
it: eight jobs, of which search, final and baseline runs are submitted and the data stage and the small
table rules run on the submitting machine as localrules), in a copy of the workflow whose profile names the partition up.sh created (`main`,
as shipped).

Real accounting (slurmdbd + MariaDB) rather than `slurm-status-command: squeue`: the profile's
status command is sacct, as on most clusters, so the path a user gets is the path tested, and
`sacct` gives the record that every job really went through the scheduler (its state, exit code
and partition). Without accounting, sacct fails and the plugin waits forever instead of failing;
the run below has a hard timeout for that reason (the Snakemake process group is killed).

Jobs run `ewcstab` from the virtual environment: the plugin submits with `sbatch --export=ALL`, so
the PATH given to Snakemake here (the interpreter's bin folder first) is the PATH inside the jobs.

An opt-in group: it changes the machine (packages, daemons), so it runs only when asked for by name,
`python -m pytest --run-slurm -m slurm` (tests/conftest.py); the README's test command shows it as
skipped. Needs root, Linux and apt-get (or SLURM already installed); skipped otherwise, except under CI
(environment variable CI set), where a missing prerequisite fails the test. Takes about 3.5
minutes on 2 cores (cluster up 13 s, workflow about 3 min, down 5 s), plus about 40 s to install the
packages on a fresh machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, copy_workflow

pytestmark = pytest.mark.slurm

UP, DOWN = REPO / ".ci" / "slurm" / "up.sh", REPO / ".ci" / "slurm" / "down.sh"
PARTITION = "main"  # the partition profiles/slurm names; up.sh creates it
RUN_TIMEOUT = 480  # seconds for the whole workflow through SLURM (a hung status check fails here)
UP_TIMEOUT = 900  # seconds for up.sh, package installs included
# On top of config/quick.yaml + tests/workflow_tiny.yaml: one study of one trial and one final
# seed, one at a time (the single-run path; the tiny workflow itself runs batched), so the run stays short on
# 2 cores while each training stage still runs as its own SLURM job. Table 1 pulls in every stage of the
# paper's reproduction (data, run config, search workers, search summary, final and baseline runs,
# gathering, table); the search worker, then the final and baseline runs, are submitted. The figure and report
# rules of the default target are left to tests/test_workflow.py, to keep this test short.
TARGETS = ["results/tables/table1_continual.csv", "results/tables/table1_continual.md"]
ONE_STUDY = """\
continual:
  methods: [mas]
  variants: [stabilized]
  optimizer_states: [fresh]
  search:
    n_trials: 1
    trials_per_batch: 1
  final:
    seeds: 1
    seeds_per_job: 1
"""


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the SLURM test, but: {reason}")
    pytest.skip(reason)


def _run_script(script: Path, state: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "EWCSTAB_SLURM_PARTITION": PARTITION}
    return subprocess.run(["bash", str(script), str(state)], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (state in a tmp folder); torn down after the module."""
    if not sys.platform.startswith("linux"):
        _skip_or_fail("a one-node SLURM cluster needs Linux")
    if os.geteuid() != 0:
        _skip_or_fail("needs root to install and start the SLURM daemons (.ci/slurm/up.sh)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        _skip_or_fail("SLURM is not installed and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    try:
        up = _run_script(UP, state, UP_TIMEOUT)
        if up.returncode in (3, 4):  # 3: cannot install the packages; 4: another SLURM is in the way
            _skip_or_fail(f"up.sh could not bring up a cluster (exit {up.returncode}): {up.stderr[-1500:]}")
        assert up.returncode == 0, f"up.sh failed (exit {up.returncode}):\n{up.stdout[-3000:]}{up.stderr[-5000:]}"
        print(f"\nslurm cluster up in {time.monotonic() - t0:.1f} s:\n{up.stderr[-600:]}")
        yield state
    finally:
        down = _run_script(DOWN, state, 180)
        print(f"slurm cluster down (exit {down.returncode}):\n{down.stderr[-600:]}")
        assert down.returncode == 0, down.stderr[-3000:]
        assert not Path("/etc/slurm/slurm.conf").is_symlink() or not os.readlink(
            "/etc/slurm/slurm.conf").startswith(str(state)), "down.sh left /etc/slurm/slurm.conf behind"


@pytest.fixture(scope="module")
def slurm_workdir(tmp_path_factory) -> Path:
    """A copy of the workflow whose SLURM profile names the test cluster's partition."""
    work = copy_workflow(tmp_path_factory.mktemp("wf_slurm"))
    (work / "one_study.yaml").write_text(ONE_STUDY)
    # What a newcomer adapts: partition and account names (every other key as shipped).
    profile = work / "profiles" / "slurm" / "config.yaml"
    settings = yaml.safe_load(profile.read_text())
    settings["default-resources"].update(slurm_partition=PARTITION, slurm_account="")
    for rule in (settings.get("set-resources") or {}).values():
        if "slurm_partition" in rule:
            rule["slurm_partition"] = PARTITION
    profile.write_text(yaml.safe_dump(settings, sort_keys=False))
    return work


def _run_snakemake(workdir: Path, env: dict, timeout: int) -> tuple[int, str]:
    """Snakemake in its own process group, killed (SIGKILL, whole group) when it overruns."""
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm",
           # The plugin checks 10 s after a submission, then 20 s later, 30 s later, ...: a job of
           # this size (15-30 s, two Snakemake start-ups included) is seen done after 30 s.
           "--slurm-init-seconds-before-status-checks", "10",
           "--slurm-keep-successful-logs",  # the plugin deletes them by default; checked below
           "--retries", "0",  # fail on the first error instead of resubmitting
           *TARGETS,  # targets first: --configfile takes every following word as a file
           "--configfile", "config/quick.yaml", "tiny.yaml", "one_study.yaml"]
    with open(workdir / "snakemake.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            rc = None
    log = (workdir / "snakemake.out").read_text()
    if rc is None:
        pytest.fail(f"snakemake through SLURM did not finish within {timeout} s (hung status check?):\n"
                    + log[-5000:])
    return rc, log


def _slurm(*args: str, env: dict | None = None, timeout: int = 30) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def job_env(data_root) -> dict:
    """The environment Snakemake is started in: this interpreter's bin folder first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SNAKEMAKE_"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]),
               EWCSTAB_DATA=str(data_root), MPLBACKEND="Agg")
    return env


def test_jobs_see_the_submitting_environment(slurm_cluster, job_env, tmp_path):
    """sbatch --export=ALL, as the plugin submits: a job finds this environment's `ewcstab` and data."""
    out = tmp_path / "job.out"
    _slurm("sbatch", "--wait", "--export=ALL", "--mem", "100", "-p", PARTITION, "-o", str(out),
           "--wrap", 'command -v ewcstab; echo "$EWCSTAB_DATA"', env=job_env, timeout=120)
    assert out.read_text().split() == [str(Path(sys.executable).parent / "ewcstab"), job_env["EWCSTAB_DATA"]]


def test_quick_workflow_runs_through_slurm(slurm_cluster, slurm_workdir, job_env):
    work = slurm_workdir
    t0 = time.monotonic()
    rc, log = _run_snakemake(work, job_env, RUN_TIMEOUT)
    wall = time.monotonic() - t0
    slurm_logs = sorted((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert rc == 0, (f"snakemake exited {rc} after {wall:.0f} s:\n{log[-6000:]}\n"
                     + "".join(f"\n--- {p}\n{p.read_text()[-1500:]}" for p in slurm_logs[-3:]))
    print(f"workflow through SLURM: {wall:.1f} s")

    # The outputs: one study, one final seed and one baseline seed, two tasks each.
    table = pd.read_csv(work / "results/tables/table1_continual.csv")
    assert list(zip(table.arch, table.method, table.variant)) == [("mlp", "mas", "stabilized")]
    assert (table.n_runs == 1).all() and table.mean_acc_last.between(0.1, 1.0).all()
    assert (work / "results/tables/table1_continual.md").exists()
    runs = pd.read_csv(work / "results/tables/continual_runs.csv")
    assert set(runs.role) == {"final", "baseline"} and len(runs) == 2 * 2

    # Every job went through sbatch: Snakemake logged a SLURM job id for it, and its SLURM log exists.
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    stats = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal\s+(\d+)", log, re.S)
    assert stats, log[:3000]
    rules = {line.split()[0] for line in stats.group(1).splitlines() if line.strip()}
    local_rules = set(re.findall(r"^localrule (\w+):", log, re.M))  # run by Snakemake itself, not submitted
    submitted_rules = rules - local_rules
    assert {"tune_lambda", "train_final", "train_baseline"} <= submitted_rules
    # the data stage (it may need the internet) and the small table rules stay on the submitting machine
    assert {"fetch_dataset", "write_run_config", "summarize_search", "gather_runs", "make_table1"} <= local_rules
    n_local = len(re.findall(r"^localrule \w+:", log, re.M))
    assert len(job_ids) == len(set(job_ids)) == int(stats.group(2)) - n_local, (job_ids, stats.group(0))
    for job_id in job_ids:
        assert [p for p in slurm_logs if p.name == f"{job_id}.log"], f"no .snakemake/slurm_logs/**/{job_id}.log"
    assert {p.relative_to(work / ".snakemake" / "slurm_logs").parts[0] for p in slurm_logs} == {
        f"rule_{r}" for r in submitted_rules}

    # ... and the scheduler has them: sacct (slurmdbd) records each as completed on our partition,
    # under the run's job name, and slurmctld logged its completion.
    acct = _slurm("sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,JobName,Partition,State,ExitCode")
    rows = [line.split("|") for line in acct.splitlines() if line]
    assert sorted(r[0] for r in rows) == sorted(job_ids), acct
    assert {(r[2], r[3], r[4]) for r in rows} == {(PARTITION, "COMPLETED", "0:0")}, acct
    run_uuid = re.search(r"SLURM run ID: (\S+)", log).group(1)
    assert {r[1] for r in rows} == {run_uuid}, acct
    ctld_log = (slurm_cluster / "log" / "slurmctld.log").read_text()
    for job_id in job_ids:
        assert re.search(rf"_job_complete: JobId={job_id} done", ctld_log), f"slurmctld has no record of job {job_id}"
