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
