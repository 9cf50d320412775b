"""Run configuration: one dataclass, validated field by field.

Defaults are the paper's protocol (docs/protocol.md): Adam, lr 1e-3, batch 100,
6 epochs per task, importances on the last 5,000 training samples of a task,
SI damping 0.1, stabilizer alpha equal to the learning rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewcstab.errors import ConfigError

ARCHS = ("mlp", "cnn", "attention")
SEQUENCES = ("permuted_mnist", "mnist_fmnist_rot90")
METHODS = ("fisher", "mas", "si", "signal")
VARIANTS = ("original", "stabilized", "clipped")
OPTIMIZERS = ("adam", "sgd")
FISHER_LABELS = ("true", "predicted")
OPTIMIZER_STATES = ("fresh", "carried")

#: A carried chain's donor run has seed ``DONOR_SEED_OFFSET + (the chain's first seed)``: far from the
#: seeds of counted runs (final runs 0..N-1, search trials 1000+), so a donor is never a counted run.
DONOR_SEED_OFFSET = 1_000_000

#: The paper's task sequence for each architecture (attention: ours, the CNN's).
DEFAULT_SEQUENCE = {"mlp": "permuted_mnist", "cnn": "mnist_fmnist_rot90", "attention": "mnist_fmnist_rot90"}


@dataclass
class RunConfig:
    """Everything that determines one continual-learning run.

    arch: mlp | cnn | attention.
    sequence: permuted_mnist | mnist_fmnist_rot90 (default: the paper's for the arch).
    n_tasks: number of tasks; None = the sequence's full length (10 or 4).
    method: importance used for consolidation: fisher | mas | si | signal.
    variant: penalty form: original | stabilized | clipped (original + grad-norm clipping).
    lam: penalty strength lambda >= 0 (0 = plain fine-tuning).
    seed: initialisation and data-order seed.
    epochs, batch_size, lr: per-task training (paper: 6, 100, 1e-3).
    optimizer: adam (paper) | sgd (where the overshoot algebra is exact).
    alpha: step size in the stabilized coefficient; None = lr (paper).
    clip_norm: max total gradient norm for the clipped variant.
    importance_samples: last N training samples used for importances (paper: 5000).
    si_xi: SI damping term added to (theta_end - theta_start)^2 (paper: 0.1).
    fisher_label: label in the Fisher's log-likelihood: true (paper, empirical) | predicted.
    train_subset / test_subset: first N samples of each split (None = all), for quick runs.
    perm_seed: seed of the permuted-MNIST pixel permutations (part of the task sequence).
    optimizer_state: fresh | carried. fresh: every run starts with a new optimizer (docs/protocol.md).
        carried: as the authors' scripts ran (their Adam was created once per process and never reset
        between runs), the run starts from the optimizer state (Adam's moments and step count) left at
        the end of the run before it in its chain (see ``chain_of``).
    chain_length: carried mode: counted runs per chain. Seeds are grouped into consecutive blocks of
        this many (seed s is in the block starting at s - s % chain_length); a block's chain is a donor
        run (seed ``DONOR_SEED_OFFSET`` + the block's first seed, fresh optimizer, not counted), then the
        block's seeds in increasing order, each inheriting the optimizer state of the one before.
    device: auto | cpu | cuda | cuda:N.
    data_root: torchvision data folder; None = $EWCSTAB_DATA, else ./data.
    download: let torchvision download missing data.
    eval_batch_size: batch for test-set evaluation (no effect on results).
    blowup_factor, blowup_cap: a finite loss above min(cap, factor * max(first loss of the task,
        ln 10)) also counts as divergence ('loss blow-up'); a huge value (1e30) switches it off.
    """

    arch: str = "mlp"
    method: str = "fisher"
    variant: str = "original"
    lam: float = 0.0
    seed: int = 0
    sequence: str | None = None
    n_tasks: int | None = None
    epochs: int = 6
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"
    alpha: float | None = None
    clip_norm: float = 1.0
    importance_samples: int = 5000
    si_xi: float = 0.1
    fisher_label: str = "true"
    train_subset: int | None = None
    test_subset: int | None = None
    perm_seed: int = 0
    optimizer_state: str = "fresh"
    chain_length: int = 1
    device: str = "auto"
    data_root: str | None = None
    download: bool = True
    eval_batch_size: int = 2000
    blowup_factor: float = 100.0
    blowup_cap: float = 1e4

    # ------------------------------------------------------------------ #
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {unknown}; allowed fields: {', '.join(sorted(known))}"
            )
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}; expected a YAML or JSON file of run settings")
        import yaml

        kind = "JSON" if path.suffix == ".json" else "YAML"  # any other name is read as YAML (JSON is YAML too)
        try:
            text = path.read_text()
            values = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError: a ValueError
            raise ConfigError(f"config file {str(path)!r} is not readable as {kind}: {_one_line(err)}") from None
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "RunConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ #
    @property
    def resolved_sequence(self) -> str:
        return self.sequence or DEFAULT_SEQUENCE[self.arch]

    @property
    def resolved_alpha(self) -> float:
        return self.lr if self.alpha is None else self.alpha

    def resolved(self) -> "RunConfig":
        """The same config with every None default made explicit (for records)."""
        from ewcstab.data import sequence_length

        return dataclasses.replace(
            self,
            sequence=self.resolved_sequence,
            n_tasks=self.n_tasks or sequence_length(self.resolved_sequence),
            alpha=self.resolved_alpha,
        )

    def validate(self) -> None:
        _choice("arch", self.arch, ARCHS)
        _choice("method", self.method, METHODS)
        _choice("variant", self.variant, VARIANTS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("fisher_label", self.fisher_label, FISHER_LABELS)
        _choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        if self.sequence is not None:
            _choice("sequence", self.sequence, SEQUENCES)
        _number("lam", self.lam, minimum=0.0)
        _number("lr", self.lr, minimum=0.0, exclusive=True)
        _number("clip_norm", self.clip_norm, minimum=0.0, exclusive=True)
        _number("si_xi", self.si_xi, minimum=0.0, exclusive=True)
        for name in ("blowup_factor", "blowup_cap"):
            value = getattr(self, name)
            _number(name, value, minimum=1.0, exclusive=True)  # finite: records never hold inf
        if self.alpha is not None:
            _number("alpha", self.alpha, minimum=0.0, exclusive=True)
        for name in ("seed", "perm_seed"):
            _integer(name, getattr(self, name), minimum=0)
        if self.optimizer_state == "carried" and self.seed >= DONOR_SEED_OFFSET:
            raise ConfigError(f"seed: {self.seed} is not allowed with optimizer_state carried; allowed: an "
                              f"integer < {DONOR_SEED_OFFSET} (larger seeds are the chains' donors)")
        for name in ("epochs", "batch_size", "importance_samples", "eval_batch_size", "chain_length"):
            _integer(name, getattr(self, name), minimum=1)
        for name in ("n_tasks", "train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum=1)
        if self.n_tasks is not None:
            from ewcstab.data import sequence_length

            longest = sequence_length(self.resolved_sequence)
            if self.n_tasks > longest:
                raise ConfigError(
                    f"n_tasks: {self.n_tasks} is more than the {longest} tasks of sequence "
                    f"{self.resolved_sequence!r}; allowed: 1..{longest}"
                )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ConfigError(f"device: {self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
        if self.data_root is not None and (not isinstance(self.data_root, str) or not self.data_root):
            raise ConfigError(f"data_root: {self.data_root!r} is not allowed; allowed: a folder path (text), "
                              "or null for $EWCSTAB_DATA, else ./data")
        if not isinstance(self.download, bool):
            raise ConfigError(f"download: {self.download!r} must be true or false")


def _one_line(err: Exception) -> str:
    """An exception's message on one line (parsers report over several)."""
    return " ".join(str(err).split())


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _number(name: str, value: Any, minimum: float, exclusive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} must be a finite number")
    if value < minimum or (exclusive and value == minimum):
        bound = ">" if exclusive else ">="
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: a number {bound} {minimum:g}")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} must be an integer")
    if value < minimum:
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: an integer >= {minimum}")


def chain_of(seed: int, chain_length: int) -> list[int]:
    """The seeds trained, in order, to reach the carried run ``seed``: the donor of its block, then the
    block's seeds up to and including ``seed`` (see ``RunConfig.optimizer_state``)."""
    first = seed - seed % chain_length
    return [DONOR_SEED_OFFSET + first, *range(first, seed + 1)]
