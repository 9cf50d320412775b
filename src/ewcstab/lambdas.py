"""Lambda records: where the final runs' lambda comes from.

The final runs read ``best_lambda`` from a JSON record (``ewcstab run --lam-from``): the search's result
(``ewcstab search``), or a lambda fixed in the workflow's config (``continual.fixed_lambda``, e.g. the
paper's best lambda, to reproduce its Table 1 without searching), written by ``fixed_lambda_record``.
"""

from __future__ import annotations

import math

from ewcstab.errors import ConfigError


def fixed_lambda_record(arch: str, method: str, variant: str, lam: float) -> dict[str, object]:
    """The lambda record of a study whose lambda is fixed in config (no search: ``mode`` "fixed")."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"continual.fixed_lambda.{arch}.{method}.{variant}: {lam!r} is not allowed; "
                          "allowed: a finite number >= 0")
    return {"arch": arch, "method": method, "variant": variant, "mode": "fixed", "best_lambda": float(lam),
            "best_value": None, "n_trials": {}, "source": "continual.fixed_lambda in the workflow's config"}
