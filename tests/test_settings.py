"""`bs.settings.n_jobs`: threads follow the CPUs the process may use, one setting changes them all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import bitro_sc as bs
from bitro_sc import _settings


def test_available_cpus_follows_affinity_and_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(_settings, "_cgroup_quota", lambda: None)
    assert _settings.available_cpus() == 4
    monkeypatch.setattr(_settings, "_cgroup_quota", lambda: 1.5)  # cpu.max "150000 100000"
    assert _settings.available_cpus() == 2
    monkeypatch.setattr(_settings, "_cgroup_quota", lambda: 0.2)
    assert _settings.available_cpus() == 1


def test_n_jobs_sets_torch_threads_and_none_restores_the_default():
    import torch

    old = bs.settings._n_jobs
    try:
        bs.settings.n_jobs = 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        bs.settings.n_jobs = None
        assert bs.settings.n_jobs == _settings.available_cpus()
        assert torch.get_num_threads() == _settings.available_cpus()
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="n_jobs"):
                bs.settings.n_jobs = bad
    finally:
        bs.settings.n_jobs = old


def test_environment_variable_and_passive_openmp_at_import():
    code = (
        "import os, bitro_sc as bs, torch; "
        "print(bs.settings.n_jobs, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"BITRO_SC_N_JOBS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["1", "1", "PASSIVE"]
    bad = subprocess.run(
        [sys.executable, "-c", "import bitro_sc"],
        env=env | {"BITRO_SC_N_JOBS": "many"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "BITRO_SC_N_JOBS" in bad.stderr


def _stderr_of(code: str) -> str:
    cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return done.stderr


def test_info_lines_are_shown_without_logging_configured() -> None:
    """A fresh process (as in Jupyter: no root handler) sees bitro_sc's INFO lines once, on stderr."""
    hello = "import logging, bitro_sc; logging.getLogger('bitro_sc').info('step ran')"
    assert _stderr_of(hello).count("bitro_sc: step ran") == 1
    quiet = "import logging, bitro_sc as bs; bs.settings.verbosity = 'warning'; " + hello.split("; ", 1)[1]
    assert "step ran" not in _stderr_of(quiet)
    # an application that configures logging gets the line through its own handler, not twice
    configured = "import logging; logging.basicConfig(format='app: %(message)s'); " + hello.split("; ", 1)[1]
    err = _stderr_of("import bitro_sc; " + configured)
    assert err.count("step ran") == 1
    assert "app: step ran" in err


def test_verbosity_is_checked() -> None:
    with pytest.raises(ValueError, match="`verbosity` must be one of"):
        bs.settings.verbosity = "loud"  # type: ignore[assignment]
    assert bs.settings.verbosity == "info"
