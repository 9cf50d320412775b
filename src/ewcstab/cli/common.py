"""What every command shares: the one-line argument parser, the run flags, and the checks of inputs and
outputs that run before any work.

Light on purpose: ``ewcstab --help`` and argument errors import nothing heavier than ``ewcstab.config``
(no torch, pandas or optuna); the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ewcstab.config import ARCHS, METHODS, OPTIMIZER_STATES, OPTIMIZERS, SEQUENCES, VARIANTS, RunConfig
from ewcstab.errors import ConfigError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (what is wrong, and where the help is), not the
    usage block: every user error of ``ewcstab`` reads the same way."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: an integer >= {minimum}")
    return value


#: CLI flag -> RunConfig field, for the overrides every training command accepts.
RUN_OVERRIDES = {
    "arch": "arch", "method": "method", "variant": "variant", "lam": "lam", "seed": "seed",
    "sequence": "sequence", "tasks": "n_tasks", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "optimizer": "optimizer", "clip_norm": "clip_norm",
    "importance_samples": "importance_samples", "train_subset": "train_subset",
    "test_subset": "test_subset", "perm_seed": "perm_seed", "optimizer_state": "optimizer_state",
    "chain_length": "chain_length", "device": "device", "data_root": "data_root",
}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that trains: each overrides the same key of --config."""
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of run settings (keys as in RunConfig); flags override it")
    p.add_argument("--arch", help=f"architecture: {', '.join(ARCHS)} (default mlp)")
    p.add_argument("--method", help=f"importance: {', '.join(METHODS)} (default fisher)")
    p.add_argument("--variant", help=f"penalty form: {', '.join(VARIANTS)} (default original)")
    p.add_argument("--lam", type=float, help="penalty strength lambda >= 0 (default 0: no consolidation)")
    p.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
    p.add_argument("--sequence", help=f"task sequence: {', '.join(SEQUENCES)} (default: the paper's for the arch)")
    p.add_argument("--tasks", type=int, help="use only the first N tasks of the sequence")
    p.add_argument("--epochs", type=int, help="epochs per task (paper: 6)")
    p.add_argument("--batch-size", type=int, help="training batch (paper: 100)")
    p.add_argument("--lr", type=float, help="learning rate (paper: 1e-3)")
    p.add_argument("--optimizer", help=f"{', '.join(OPTIMIZERS)} (paper: adam)")
    p.add_argument("--clip-norm", type=float, help="max gradient norm of the clipped variant (default 1.0)")
    p.add_argument("--importance-samples", type=int, help="last N training samples for importances (paper: 5000)")
    p.add_argument("--train-subset", type=int, help="train on the first N training samples of each task (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test samples of each task (quick runs)")
    p.add_argument("--perm-seed", type=int, help="seed of the permuted-MNIST permutations (default 0)")
    p.add_argument("--optimizer-state", help=f"{', '.join(OPTIMIZER_STATES)}: a new optimizer per run (default), or "
                   "the state carried along a chain of runs as the authors' scripts did (see RunConfig)")
    p.add_argument("--chain-length", type=int, help="carried optimizer state: counted runs per chain (default 1)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--data-root", help="torchvision data folder (default: $EWCSTAB_DATA, else ./data)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--config file, then the explicit flags on top; --lam-from reads lambda from a search result."""
    base = RunConfig.from_file(args.config) if args.config else RunConfig()
    changes = {field: getattr(args, flag) for flag, field in RUN_OVERRIDES.items() if getattr(args, flag) is not None}
    if getattr(args, "lam_from", None):
        if "lam" in changes:
            raise ConfigError("lam: give either --lam or --lam-from, not both")
        changes["lam"] = best_lambda_from(args.lam_from)
    return base.replace(**changes)


def prepare_run(args: argparse.Namespace) -> RunConfig:
    """The validated run settings of a training command, its torch threads set, and its device checked
    (a CUDA device that is not there is refused here, before any output or study exists)."""
    cfg = config_from_args(args)
    set_threads(args.threads)
    from ewcstab.device import check_device

    check_device(cfg.device)
    return cfg


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def best_lambda_from(path: str) -> float:
    """``best_lambda`` of a search result (``ewcstab search-summary --out``)."""
    record = read_json_input("lam-from", path, "the best_lambda JSON of a search")
    value = record.get("best_lambda") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"lam-from: {path!r} is not a search result: its 'best_lambda' is {value!r}, "
                          "allowed: a finite number")
    return float(value)


# ------------------------------------------------------------------------------------- inputs, outputs
def add_table_outputs(p: argparse.ArgumentParser) -> None:
    """--csv-out, --md-out, --tex-out: one table in three forms."""
    p.add_argument("--csv-out", required=True, help="the table (CSV)")
    p.add_argument("--md-out", required=True, help="the same table in Markdown")
    p.add_argument("--tex-out", help="the same table in LaTeX (booktabs)")


def table_outputs(args: argparse.Namespace) -> dict[str, str | None]:
    return {"csv-out": args.csv_out, "md-out": args.md_out, "tex-out": args.tex_out}


def write_table_outputs(args: argparse.Namespace, csv: str, markdown: str, latex: Callable[[], str]) -> None:
    """The table's forms the flags of ``add_table_outputs`` ask for, each written atomically."""
    from ewcstab.io import write_text_atomic

    write_text_atomic(args.csv_out, csv)
    write_text_atomic(args.md_out, markdown)
    if args.tex_out:
        write_text_atomic(args.tex_out, latex())


def check_inputs(field: str, paths: str | Iterable[str] | None, what: str = "") -> None:
    """Each path is a readable file; else a ``ConfigError`` naming the flag and the file."""
    for path in _as_list(paths):
        p = Path(path)
        hint = f" (expected {what})" if what else ""
        if p.is_dir():
            raise ConfigError(f"{field}: {path!r} is a folder{hint}")
        if not p.is_file():
            raise ConfigError(f"{field}: {path!r} does not exist{hint}")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{field}: {path!r} is not readable{hint}")


def read_json_input(field: str, path: str, what: str) -> object:
    """A JSON input file's content; a missing or malformed file is a ``ConfigError`` naming it."""
    check_inputs(field, path, what)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{field}: {path!r} is not JSON ({' '.join(str(err).split())}); expected {what}") from None


def check_outputs(outputs: dict[str, str | Iterable[str] | None]) -> None:
    """Every output file (flag -> path or paths) can be written, and no two name the same file.

    Run before any work, so a mistyped path costs nothing and leaves nothing behind: a path that is a
    folder, lies under a regular file, or in a folder this process cannot write is a ``ConfigError``.
    """
    seen: dict[str, str] = {}
    for field, paths in outputs.items():
        for path in _as_list(paths):
            check_writable(field, path)
            key = os.path.realpath(path)
            if key in seen:
                also = "" if seen[key] == field else f" (also given as {seen[key]})"
                raise ConfigError(f"{field}: {path!r} is given twice{also}; every output needs its own file")
            seen[key] = field


def check_writable(field: str, path: str) -> None:
    """``path`` can be written as a file (its folders created as needed); else a ``ConfigError``."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{field}: {path!r} is a folder; give a file path")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{field}: {path!r} is not a regular file")
    _check_folder_creatable(field, path, p.parent)


def check_folder(field: str, path: str) -> None:
    """``path`` is a folder, or one that can be created, and files can be written in it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field}: {path!r} is a file, not a folder")
    _check_folder_creatable(field, path, p)


def _check_folder_creatable(field: str, path: str, folder: Path) -> None:
    existing = folder  # as the user wrote it, so the message names what they gave
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: {path!r} cannot be written: {str(existing)!r} is a file, not a folder")
    if not _can_write_in(existing):
        raise ConfigError(f"{field}: {path!r} cannot be written: folder {str(existing)!r} is not writable")


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: asked of the file system itself (a nameless temporary
    file), since permission bits do not tell for root or read-only mounts."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _as_list(paths: str | Iterable[str] | None) -> list[str]:
    if paths is None:
        return []
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
