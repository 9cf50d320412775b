"""Engine throughput: seconds per full paper-protocol run, one run at a time vs R stacked, per architecture,
against the float32 matmul floor measured in the same invocation; CPU or CUDA; JSON and a figure.

    python perf/benchmark_engine.py --device cpu --threads 1 --archs mlp cnn attention --runs 1 4 \\
        --cnn-steps 40 --json docs/results/throughput_cpu.json --figure docs/figures/throughput_cpu.png
    python perf/benchmark_engine.py --device cuda --archs mlp cnn --mlp-runs 1 20 100 --cnn-runs 1 5 20 \\
        --json docs/results/throughput_cuda.json --figure docs/figures/throughput_cuda.png

Each row trains R runs (seeds 0..R-1) of ``--method``/``--variant`` at ``--lam`` on the first two tasks of
the architecture's own sequence for one epoch each (task 1 without, task 2 with the penalty, one
importance), on the full training data or on the first ``steps x batch`` samples where ``--<arch>-steps`` is
given (the CNN on a CPU), and extrapolates to the full protocol of that architecture (docs/protocol.md:
T tasks x 6 epochs x 600 steps, T - 1 importances, T(T+1)/2 test-set evaluations):

    seconds/run = s1 * S + s2 * (T - 1) * S + importance * (T - 1) + evaluation_per_test_set * T(T+1)/2

s1, s2: measured seconds per step per run of task 1 and task 2, S = 3,600 steps per task. The floor is
the FLOPs of the matrix products and convolutions of that full run (one training step, one importance and
one test-set evaluation counted by ``torch.utils.flop_counter.FlopCounterMode`` on the engine's own code,
times their numbers in the protocol), divided by the float32 throughput of a large ``torch.mm`` on the same
device and threads: what no implementation can go below on this machine. The matmul speed of a
shared machine drifts, so it is measured again after every row: each row is divided by the floor at the
better of the speeds measured just before and just after it (``floor_ratio``), and, strictest, by the floor
at the best speed of the whole invocation (``floor_ratio_best``). Each row is timed ``--repeat`` times and
the fastest kept. ``--baseline-src DIR`` also times the engines of an earlier checkout of this project
(commit 0230949 and before: its ``benchmark-batched`` command) in a subprocess, in the same invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ewcstab.config import RunConfig
from ewcstab.engine import Engine
from ewcstab.runner import load_run_data

FULL_EPOCHS, FULL_STEPS_PER_EPOCH = 6, 600  # the protocol: 6 epochs of 60,000 samples at batch 100
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, reps: int = 10) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) float32 torch.mm on ``device`` with the current threads."""
    n = MATMUL_SIZE[device.type]
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    synchronize(device)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def protocol_config(args: argparse.Namespace, arch: str) -> RunConfig:
    """Two tasks of the arch's own sequence, one epoch each, the paper's settings otherwise."""
    steps = getattr(args, f"{arch}_steps")
    return RunConfig(arch=arch, method=args.method, variant=args.variant, lam=args.lam, n_tasks=2, epochs=1,
                     train_subset=None if steps is None else steps * 100, device=args.device,
                     data_root=args.data_root, download=False, eval_batch_size=1000)


def time_row(cfg: RunConfig, tasks, device: torch.device, runs: int) -> dict[str, float]:
    """Seconds per step per run (task 1, task 2), per importance per run and per test-set evaluation per run."""
    engine = Engine([cfg.replace(seed=s) for s in range(runs)], device)
    marks = [time.perf_counter()]

    def mark() -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    engine.train_task(1, tasks[0])
    mark()
    engine.evaluate(tasks[:1])
    mark()
    engine.consolidate(1, tasks[0])
    mark()
    engine.train_task(2, tasks[1])
    mark()
    steps = math.ceil(tasks[0].train_x.shape[0] / cfg.batch_size)
    t = [b - a for a, b in zip(marks, marks[1:])]
    return {"step_task1": t[0] / steps / runs, "evaluation_per_test_set": t[1] / runs,
            "importance": t[2] / runs, "step_later": t[3] / steps / runs}


def protocol_flops(cfg: RunConfig, tasks, device: torch.device) -> dict[str, float]:
    """FLOPs of one full-protocol run of ``cfg.arch``, counted on the engine's own code with one run."""
    engine = Engine([cfg], device)
    engine.train_task(1, tasks[0])
    engine.consolidate(1, tasks[0])
    counts = {}
    for name, call in (("step", lambda: engine._train_step(torch.arange(cfg.batch_size, device=device)
                                                           .unsqueeze(0), tasks[1], _monitor(engine, device))),
                       ("importance", lambda: engine.consolidate(1, tasks[0])),
                       ("evaluation", lambda: engine.evaluate(tasks[:1]))):
        with FlopCounterMode(display=False) as counter:
            call()
        counts[name] = float(counter.get_total_flops())
    # the evaluation call evaluates one test set of the measured (maybe subset) size: scale to the full 10,000
    counts["evaluation"] *= 10_000 / tasks[0].test_x.shape[0]
    n_tasks = cfg.replace(n_tasks=None).resolved().n_tasks
    steps = n_tasks * FULL_EPOCHS * FULL_STEPS_PER_EPOCH
    total = (counts["step"] * steps + counts["importance"] * (n_tasks - 1)
             + counts["evaluation"] * n_tasks * (n_tasks + 1) / 2)
    return {**counts, "tasks": n_tasks, "steps": steps, "total": total}


def _monitor(engine: Engine, device: torch.device):
    from ewcstab.telemetry import TaskMonitor

    engine.importance.begin_task(engine.runs.params)
    return TaskMonitor(2, len(engine.ids), 1, device, engine.penalty.step_gain(), engine.penalty.clip_norm)


def full_run_seconds(t: dict[str, float], n_tasks: int) -> float:
    per_task = FULL_EPOCHS * FULL_STEPS_PER_EPOCH
    return (t["step_task1"] * per_task + t["step_later"] * (n_tasks - 1) * per_task
            + t["importance"] * (n_tasks - 1) + t["evaluation_per_test_set"] * n_tasks * (n_tasks + 1) / 2)


def baseline_rows(src: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """The MLP engines of an earlier checkout (its ``benchmark-batched``), timed in a subprocess now."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        cmd = [sys.executable, "-c", "import sys; from ewcstab.cli import main; sys.exit(main())",
               "benchmark-batched", "--method", args.method, "--variant", args.variant, "--lam", str(args.lam),
               "--threads", str(args.threads or torch.get_num_threads()), "--runs", "4", "--repeat", "1",
               "--json", str(out)]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows = json.loads(out.read_text())["rows"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True,
                            text=True).stdout.strip() or "baseline"
    return [{"arch": "mlp", "engine": f"{r['engine']} @{commit}", "runs": r["runs"],
             "seconds_per_run": r["full_run_seconds"]} for r in rows if r["engine"] in ("autograd", "batched")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--archs", nargs="+", default=["mlp"], choices=["mlp", "cnn", "attention"])
    p.add_argument("--runs", nargs="+", type=int, default=[1, 4], help="R of each row (1: one run at a time)")
    for arch in ("mlp", "cnn", "attention"):
        p.add_argument(f"--{arch}-steps", type=int, help=f"{arch}: time this many steps per task (default all 600)")
        p.add_argument(f"--{arch}-runs", type=int, nargs="+", help=f"{arch}: R of each row (default --runs)")
    p.add_argument("--method", default="mas")
    p.add_argument("--variant", default="original")
    p.add_argument("--lam", type=float, default=4.5)
    p.add_argument("--repeat", type=int, default=1, help="time each row this many times, keep the fastest")
    p.add_argument("--data-root", help="torchvision data root (default: $EWCSTAB_DATA)")
    p.add_argument("--baseline-src", help="also time an earlier checkout's engines (its src folder)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--figure", help="draw the result here (PNG)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    speeds = [matmul_flops(device)]
    rows: list[dict[str, object]] = []
    for arch in args.archs:
        cfg = protocol_config(args, arch)
        tasks, _, _ = load_run_data(cfg)
        flops = protocol_flops(cfg, tasks, device)
        speeds.append(matmul_flops(device))
        for runs in getattr(args, f"{arch}_runs") or args.runs:
            timings = []
            for _ in range(args.repeat):
                timings.append(time_row(cfg, tasks, device, runs))
                speeds.append(matmul_flops(device))
            best = min(timings, key=lambda t: full_run_seconds(t, flops["tasks"]))
            around = max(speeds[-2:])
            seconds = full_run_seconds(best, flops["tasks"])
            rows.append({"arch": arch, "engine": "engine", "runs": runs, "seconds_per_run": seconds,
                         **{k: v for k, v in best.items()}, "flops_per_run": flops["total"],
                         "matmul_flops_around": around, "floor_seconds": flops["total"] / around,
                         "floor_ratio": seconds / (flops["total"] / around)})
            print(f"{arch:9s} R={runs:<4d} {seconds:8.2f} s/run  {rows[-1]['floor_ratio']:.2f}x floor  "
                  f"(step {best['step_task1'] * 1e3:.3f} / {best['step_later'] * 1e3:.3f} ms per run; "
                  f"matmul {around / 1e9:.0f} GFLOP/s)", flush=True)
    if args.baseline_src:
        rows += baseline_rows(args.baseline_src, args)
        speeds.append(matmul_flops(device))
    best_speed = max(speeds)
    for row in rows:
        if "flops_per_run" in row:
            row["floor_ratio_best"] = row["seconds_per_run"] / (row["flops_per_run"] / best_speed)
        else:  # baseline rows: against the MLP floor at the invocation's best speed
            mlp = next((r for r in rows if r["arch"] == "mlp" and "flops_per_run" in r), None)
            if mlp is not None:
                row["floor_ratio_best"] = row["seconds_per_run"] / (mlp["flops_per_run"] / best_speed)
    from ewcstab import provenance

    result = {
        "git": provenance.git_commit(), "numerics": provenance.numerics(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                   platform.machine()),
        "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "method": args.method, "variant": args.variant, "lam": args.lam,
        "matmul_flops": {"best": best_speed, "samples": speeds, "median": statistics.median(speeds)},
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.figure:
        from ewcstab.figures.style import save_figure, set_style
        from ewcstab.figures.throughput import plot_throughput

        set_style()
        save_figure(plot_throughput(result), args.figure)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
