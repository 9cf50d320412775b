"""Device names: a CUDA device torch does not see is a one-line ConfigError; auto says what it chose."""

from __future__ import annotations

import logging

import pytest
import torch

from ewcstab.config import ConfigError
from ewcstab.device import check_device, resolve_device


def test_auto_logs_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="ewcstab.device"):
        device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [r.getMessage() for r in caplog.records if r.name == "ewcstab.device"][0].startswith("device auto: ")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ewcstab.device"):
        assert check_device("auto") == device  # the check alone says nothing
    assert not caplog.records


def test_missing_cuda_device_is_a_config_error():
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device: 'cuda:\d+' was asked for, but torch sees \d+ CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match=rf"device: '{name}' was asked for, but torch sees no CUDA device"):
                check_device(name)
    assert check_device("cpu") == torch.device("cpu")
