"""``ewcstab benchmark-batched``: seconds per paper-protocol MLP run, single-run path vs the batched engine.

Measures both engines on the first ``--tasks`` tasks with ``--epochs`` epochs each (default 2 x 1 of the
full 60,000 training samples: task 1 trains without and task 2 with the penalty, and one importance is
computed) and extrapolates each run to the full protocol (PROTOCOL.md: 10 tasks x 6 epochs x 600 steps,
9 importances, 55 test-set evaluations):

    seconds/run = s_1 * S + s_2+ * 9 S + importance * 9 + eval_per_test_set * 55 + per_task * 10,
    S = 3,600 steps per task

with s_1 / s_2+ the measured seconds per step of task 1 / later tasks (per run: a batch's time divided
by its R runs), eval_per_test_set the measured time of the evaluations per test set (every path's own
evaluation call timed: ``train.accuracy``, the engine's ``_Batch._evaluate``) and per_task the rest of the
wall time per measured task (telemetry summaries, checks, setup). Where the evaluations are not timed,
all of the rest counts as evaluation (what this benchmark did before: it charged the per-task rest 55 times
instead of 10).

The floor: the FLOPs of one full run, i.e. per step forward 2 B sum(in*out) and backward ~2x forward,
times 36,000 steps, plus the 55 test-set evaluations (forward) and the 9 importances (forward +
backward for fisher/mas, forward for signal), divided by the measured float32 throughput of one large
``torch.mm`` with the same thread count. Reported: seconds per run, runs per hour, and seconds per run /
floor (the issue's target: at most 1.5 for the batched engine). Timings depend on the machine and on
what else runs on it: the load average before and after each measurement is reported with it. The matmul
speed of this shared machine drifts by 10-20% within minutes (and spikes for seconds), so it is measured
again after every engine's measurement: each row's ``floor_ratio`` divides by the floor at the better of the
matmul speeds measured just before and just after it (the machine in the state the row was measured in),
``floor_ratio_sitting_best`` by the floor at the best speed seen in the whole sitting (the strictest view).
The printed ratios use the first measurement; the JSON and the figure these. Each engine is timed
``--repeat`` times (default 3) and the fastest time is reported, as the floor takes the fastest of its
matmul repetitions: both sides at the machine's least disturbed; every repeat's wall time is in the JSON.

``--baseline-src DIR`` also times the single-run path of another checkout of this project (its ``src``
folder, e.g. ``git worktree add /tmp/before a786f49`` then ``--baseline-src /tmp/before/src``) in a
subprocess, in the same sitting and with the same extrapolation: "how much faster than before" compared
on the same machine state, not across sittings whose matmul speed differs by ~10%.

The matmul floor leaves out what no implementation can skip besides the products: each step the
optimizer must read the parameters, gradient, both Adam moments, the anchor and the penalty
coefficients and write the parameters and both moments, ``OPTIMIZER_TRANSFERS`` = 9 float32 transfers
per parameter. At the measured copy bandwidth of an (R x P)-float buffer (``copy_bandwidth``) that
is the memory floor; matmul floor + memory floor is a lower bound for any implementation on this
machine, also reported as a multiple of the matmul floor. (Adam's arithmetic is a bound of its own: two
divisions and a square root per parameter and step, ~2 cycles per parameter on the development Xeon's
divider even with all data in L1, ~0.2 ms per run and step; any update bitwise equal to torch's pays it.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ewcstab.cli import add_run_arguments, config_from_args

FULL_TASKS, FULL_EPOCHS, FULL_TRAIN, FULL_TEST = 10, 6, 60_000, 10_000
OPTIMIZER_TRANSFERS = 9  # per parameter and step: read theta, grad, m, v, anchor, coef; write theta, m, v
MLP_PARAMS = 784 * 300 + 300 + 300 * 150 + 150 + 150 * 10 + 10  # 282,460
IMPORTANCE_FORWARDS = {"fisher": 3.0, "mas": 3.0, "signal": 1.0, "si": 0.0}  # forward-pass equivalents per sample


def matmul_throughput(size: int = 2048, reps: int = 10) -> dict[str, float]:
    """FLOP/s of a (size x size) @ (size x size) float32 torch.mm on this machine's current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {"best": flops / min(times), "median": flops / statistics.median(times), "size": size, "reps": reps}


def copy_bandwidth(numel: int, reps: int = 50) -> float:
    """Bytes per second of ``dst.copy_(src)`` on two float32 buffers of ``numel`` (read + write counted)."""
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * 4 * numel / statistics.median(times)


def protocol_flops(method: str, widths: tuple[int, ...] = (784, 300, 150, 10), batch: int = 100) -> dict[str, float]:
    """FLOPs of one full paper-protocol MLP run (weights' multiply-adds; biases and activations neglected)."""
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:]))  # per sample: 281,700 for the paper's MLP
    forward = 2.0 * macs
    steps = FULL_TASKS * FULL_EPOCHS * math.ceil(FULL_TRAIN / batch)
    train = steps * 3.0 * forward * batch  # forward + backward (~2x forward)
    evaluation = sum(range(1, FULL_TASKS + 1)) * FULL_TEST * forward
    importance = (FULL_TASKS - 1) * 5000 * forward * IMPORTANCE_FORWARDS[method]
    return {"train": train, "evaluation": evaluation, "importance": importance,
            "total": train + evaluation + importance, "steps": steps}


def extrapolate(train: list[float], importance: list[float], wall: float, steps_per_task: int,
                evaluation: float | None = None) -> dict[str, float]:
    """One run's measured seconds (per task; ``evaluation``: all its evaluations, None if not timed) -> seconds
    of a full protocol run (module docstring)."""
    first = train[0] / steps_per_task
    later = sum(train[1:]) / (len(train) - 1) / steps_per_task if len(train) > 1 else first
    imp = sum(importance) / len(importance) if importance else 0.0
    test_sets = sum(range(1, len(train) + 1))
    rest = max(wall - sum(train) - sum(importance), 0.0)
    if evaluation is None:
        per_eval, per_task = rest / test_sets, 0.0
    else:
        per_eval, per_task = evaluation / test_sets, max(rest - evaluation, 0.0) / len(train)
    full_steps = FULL_EPOCHS * math.ceil(FULL_TRAIN / 100)
    seconds = (first * full_steps + later * full_steps * (FULL_TASKS - 1) + imp * (FULL_TASKS - 1)
               + per_eval * sum(range(1, FULL_TASKS + 1)) + per_task * FULL_TASKS)
    return {"step_seconds_task1": first, "step_seconds_later": later, "importance_seconds": imp,
            "eval_seconds_per_test_set": per_eval, "other_seconds_per_task": per_task, "full_run_seconds": seconds}


@contextlib.contextmanager
def timed_calls(owner: object, name: str):
    """Replace ``owner.name`` by a wrapper that sums the seconds spent in it; yields a one-element list."""
    real, total = getattr(owner, name), [0.0]

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield total
    finally:
        setattr(owner, name, real)


#: Run in a subprocess with another checkout's ``src`` on the path: its own config, data and run_sequence
#: (the API every commit of this project has, evaluating through ``ewcstab.train.accuracy``, which is timed), one
#: thread count; prints the run's timings as JSON.
BASELINE_SCRIPT = """
import json, sys, time, torch
import ewcstab.train as train
from ewcstab.config import RunConfig
from ewcstab.data import build_tasks
from ewcstab.train import run_sequence
accuracy, spent = train.accuracy, [0.0]
def timed_accuracy(*args, **kwargs):
    start = time.perf_counter()
    out = accuracy(*args, **kwargs)
    spent[0] += time.perf_counter() - start
    return out
train.accuracy = timed_accuracy
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
cfg = RunConfig(**spec["config"])
r = cfg.resolved()
device = torch.device("cpu")
tasks = build_tasks(r.sequence, r.n_tasks, cfg.perm_seed, spec["root"], device, cfg.train_subset, cfg.test_subset,
                    False)
start = time.perf_counter()
out = run_sequence(cfg, tasks, device)
print(json.dumps({"train": out.train_seconds, "importance": out.importance_seconds,
                  "wall": time.perf_counter() - start, "evaluation": spent[0]}))
"""


def time_baseline(src: str, cfg, root: str, threads: int) -> dict[str, object]:
    """Time ``run_sequence`` of the checkout whose package is under ``src`` (``BASELINE_SCRIPT``) for ``cfg``'s
    protocol on the CPU; returns its timings (train, importance, wall, evaluation seconds)."""
    fields = ("method", "variant", "lam", "seed", "n_tasks", "epochs", "train_subset", "test_subset")
    spec = {"threads": threads, "root": root, "config": {f: getattr(cfg, f) for f in fields} | {"download": False}}
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    done = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=Path(src).resolve().parent)
    if done.returncode:
        raise SystemExit(f"--baseline-src {src}: the baseline run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_name(src: str) -> str:
    """The short commit of the checkout whose package is under ``src``, or the folder's name."""
    git = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else Path(src).resolve().parent.name


def _load() -> float:
    return os.getloadavg()[0]


def benchmark_batched(args: argparse.Namespace) -> dict[str, object]:
    from ewcstab.batched import train_batched
    from ewcstab.data import build_tasks, resolve_data_root
    from ewcstab.device import resolve_device, synchronize
    from ewcstab.train import run_sequence

    cfg = config_from_args(args)
    if args.lam is None:
        cfg = cfg.replace(lam=1.0)
    resolved = cfg.resolved()
    device = resolve_device(cfg.device)
    tasks = build_tasks(resolved.sequence, resolved.n_tasks, cfg.perm_seed, resolve_data_root(cfg.data_root), device,
                        cfg.train_subset, cfg.test_subset, cfg.download)
    steps_per_task = cfg.epochs * math.ceil(tasks[0].train_x.shape[0] / cfg.batch_size)
    flops = protocol_flops(cfg.method, batch=cfg.batch_size)
    mm = matmul_throughput(args.matmul_size)
    matmul_samples = [mm["best"]]  # measured again after every timed run (see the module doc)
    floor = flops["total"] / mm["best"]
    floor_median = flops["total"] / mm["median"]
    memory_floors = {}
    for runs in sorted({1, *args.runs}):
        bandwidth = copy_bandwidth(runs * MLP_PARAMS)
        memory_floors[runs] = {"bandwidth": bandwidth,
                               "seconds": flops["steps"] * OPTIMIZER_TRANSFERS * 4 * MLP_PARAMS / bandwidth}
    threads = torch.get_num_threads()
    print(f"threads {threads}; matmul {mm['best'] / 1e9:.1f} GFLOP/s best, {mm['median'] / 1e9:.1f} median; "
          f"one full run = {flops['total'] / 1e12:.2f} TFLOP -> floor {floor:.1f} s/run "
          f"({floor_median:.1f} s at the median throughput)", flush=True)
    print("memory floor (9 float32 transfers per parameter and step at the copy bandwidth of R runs' buffers): "
          + ", ".join(f"R={r}: {m['seconds']:.1f} s/run ({m['bandwidth'] / 1e9:.1f} GB/s)" for r, m in memory_floors.items()),
          flush=True)
    print(f"measuring {len(tasks)} task(s) x {cfg.epochs} epoch(s) x {steps_per_task} steps per run, "
          f"{cfg.method}/{cfg.variant}; extrapolated to {FULL_TASKS} x {FULL_EPOCHS} x 600", flush=True)

    rows: list[dict[str, object]] = []
    around: list[list[float]] = []  # per row: the matmul speeds measured just before and after its repeats

    def measure(engine: str, runs: int, once: Callable[[], tuple[list[float], list[float], float, float]]) -> None:
        """Time ``once`` (-> per-task train and importance seconds, wall and evaluation seconds per run)
        ``--repeat`` times, the matmul speed after each time; report the fastest (the least disturbed)."""
        samples, timings = [matmul_samples[-1]], []
        for _ in range(args.repeat):
            load = _load()
            synchronize(device)
            train, imp, wall, evaluation = once()
            synchronize(device)
            timings.append((train, imp, wall, evaluation, (load, _load())))
            samples.append(matmul_throughput(args.matmul_size, reps=5)["best"])
            matmul_samples.append(samples[-1])
        around.append(samples)
        train, imp, wall, evaluation, load = min(timings, key=lambda t: t[2])
        ext = extrapolate(train, imp, wall, steps_per_task, evaluation)
        memory = memory_floors[runs]["seconds"]
        row = {"engine": engine, "runs": runs, "measured_wall_seconds": wall * runs, **ext,
               "runs_per_hour": 3600.0 / ext["full_run_seconds"], "floor_ratio": ext["full_run_seconds"] / floor,
               "memory_floor_seconds": memory, "bound_ratio": (floor + memory) / floor,
               "repeats_wall_seconds": [t[2] * runs for t in timings], "load_before": load[0], "load_after": load[1]}
        rows.append(row)
        print(f"{engine:>8} R={runs:<3} {ext['full_run_seconds']:8.1f} s/run  {row['runs_per_hour']:7.1f} runs/h  "
              f"{row['floor_ratio']:5.2f}x floor (bound {row['bound_ratio']:.2f}x)  (step {ext['step_seconds_later'] * 1e3:.2f} ms/run, measured "
              f"{', '.join(f'{w:.1f}' for w in row['repeats_wall_seconds'])} s, load {load[0]:.1f} -> {load[1]:.1f})",
              flush=True)

    def single_run(path=contextlib.nullcontext) -> tuple[list[float], list[float], float, float]:
        import ewcstab.train as train_module

        start = time.perf_counter()
        with path(), timed_calls(train_module, "accuracy") as evaluation:
            out = run_sequence(cfg, tasks, device)
        return out.train_seconds, out.importance_seconds, time.perf_counter() - start, evaluation[0]

    if args.textbook:
        from ewcstab.textbook import textbook_path

        measure("textbook", 1, lambda: single_run(textbook_path))
    if args.baseline_src:
        root = str(resolve_data_root(cfg.data_root))
        measure(f"baseline {baseline_name(args.baseline_src)}", 1,
                lambda: tuple(time_baseline(args.baseline_src, cfg, root, threads)[k]
                              for k in ("train", "importance", "wall", "evaluation")))
    if not args.no_single:
        measure("autograd", 1, single_run)

    def batched(runs: int) -> tuple[list[float], list[float], float, float]:
        from ewcstab.batched.engine import _Batch

        cfgs = [cfg.replace(seed=cfg.seed + i) for i in range(runs)]
        start = time.perf_counter()
        with timed_calls(_Batch, "_evaluate") as evaluation:
            outs = train_batched(cfgs, tasks, device, runs_per_batch=runs)  # all R runs in one batch
            synchronize(device)
        wall = time.perf_counter() - start
        return outs[0].train_seconds, outs[0].importance_seconds, wall / runs, evaluation[0] / runs

    for runs in args.runs:
        measure("batched", runs, lambda: batched(runs))
    from ewcstab.batched import native

    floor_first, floor = floor, flops["total"] / max(matmul_samples)
    for row, samples in zip(rows, around):
        local = flops["total"] / max(samples)
        row |= {"floor_seconds": local, "floor_ratio": row["full_run_seconds"] / local,
                "floor_ratio_sitting_best": row["full_run_seconds"] / floor,
                "bound_ratio": (local + row["memory_floor_seconds"]) / local}
    print(f"matmul re-measured after each engine: {', '.join(f'{m / 1e9:.1f}' for m in matmul_samples)} GFLOP/s; "
          "x floor at the speed around each row (at the sitting's best, "
          f"{max(matmul_samples) / 1e9:.1f} GFLOP/s, floor {floor:.1f} s): "
          + ", ".join(f"{r['engine']} R={r['runs']} {r['floor_ratio']:.2f}x ({r['floor_ratio_sitting_best']:.2f}x)"
                      for r in rows), flush=True)
    return {"threads": threads, "device": str(device), "matmul_flops": mm | {"sitting_samples": matmul_samples},
            "protocol_flops": flops,
            "elementwise": "native" if native.available(device) else "torch",
            "mlp_step": "native" if native.mlp_kernels((784, 300, 150, 10)) is not None else "torch",
            "floor_seconds": floor, "floor_seconds_first_matmul": floor_first,
            "floor_seconds_median_matmul": floor_median,
            "memory_floor": {str(k): v for k, v in memory_floors.items()},
            "measured": {"tasks": len(tasks), "epochs": cfg.epochs, "steps_per_task": steps_per_task,
                         "method": cfg.method, "variant": cfg.variant},
            "rows": rows}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark-batched", help="seconds per MLP run: single-run path vs batched engine vs matmul floor",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p)
    p.set_defaults(tasks=2, epochs=1)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16, 64], help="batch sizes R to time")
    p.add_argument("--no-single", action="store_true", help="skip the autograd single-run path (run_sequence)")
    p.add_argument("--textbook", action="store_true",
                   help="also time the textbook training step (ewcstab.textbook), the single path's reference")
    p.add_argument("--baseline-src", metavar="DIR",
                   help="also time the single-run path of another checkout's src folder (e.g. an earlier commit)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n torch.mm timing the floor")
    p.add_argument("--repeat", type=int, default=3,
                   help="time each engine this many times and report the fastest (a shared machine's noise)")
    p.add_argument("--json", metavar="FILE", help="also write the timings as JSON")
    p.add_argument("--figure", metavar="FILE.png", help="also draw seconds per run and runs per hour (PNG + PDF)")

    def run(args: argparse.Namespace) -> int:
        if args.arch not in (None, "mlp"):
            raise SystemExit("benchmark-batched: the batched engine (and the floor) is the MLP's; use --arch mlp")
        result = benchmark_batched(args)
        if args.json:
            from ewcstab.io import write_json_atomic

            write_json_atomic(args.json, result)
        if args.figure:
            from pathlib import Path

            from ewcstab.figures import save_figure, set_style
            from ewcstab.figures.throughput import plot_throughput

            set_style()
            save_figure(plot_throughput(result), args.figure, Path(args.figure).with_suffix(".pdf"))
        return 0

    p.set_defaults(func=run)
