"""`bs.settings`: how many CPU threads bitro_sc's numerical libraries use, and what it reports.

:attr:`Settings.verbosity` sets which of bitro_sc's log lines are shown (``"info"`` by default:
the steps that ``fit_bitro`` / ``predict_bitro`` run by themselves, re-standardised features).
They go to the ``"bitro_sc"`` :mod:`logging` logger; when the application has not configured
logging (no handler on the root logger, the usual case in Jupyter), bitro_sc prints them to
stderr itself, so they are never lost.

Threads: one setting, :attr:`Settings.n_jobs` (or the environment variable ``BITRO_SC_N_JOBS``
read at import), sets the threads of PyTorch (intra-op), numba and dask's threaded scheduler together.
Its default is the number of CPUs this process may use: the CPU affinity mask
(:func:`os.sched_getaffinity`, e.g. ``taskset`` or a Slurm allocation) and, inside a container,
the cgroup CPU quota (``cpu.max`` / ``cpu.cfs_quota_us``), whichever is smaller.

Importing bitro_sc also sets ``OMP_WAIT_POLICY=PASSIVE`` when the variable is unset and PyTorch
is not imported yet. With the OpenMP default, a thread waiting for the others at the end of
every parallel operation spins; when other processes compete for the CPUs, the spinning threads
and the descheduled ones they wait for make each of the thousands of small operations of a
training epoch wait a scheduler time slice (measured on one HER2ST section with two threads on a
loaded 2-core machine: 3-4x slower than with the passive policy). See
``benchmarks/results/contention.md``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Literal

#: the levels of :attr:`Settings.verbosity`
VERBOSITIES = ("error", "warning", "info", "debug")

#: environment variable overriding the default of :attr:`Settings.n_jobs`
ENV_N_JOBS = "BITRO_SC_N_JOBS"


def available_cpus() -> int:
    """The number of CPUs this process may use: affinity mask and cgroup quota, at least 1.

    Examples
    --------
    >>> from bitro_sc._settings import available_cpus
    >>> available_cpus() >= 1
    True
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS / Windows: no affinity API
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); ``None``: no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1q, v1p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1q.is_file() and v1p.is_file():
            quota_us = int(v1q.read_text())
            return None if quota_us <= 0 else quota_us / int(v1p.read_text())
    except (OSError, ValueError):  # unreadable or unexpected format: no limit known
        return None
    return None


def _env_n_jobs() -> int | None:
    value = os.environ.get(ENV_N_JOBS)
    if value is None or not value.strip():
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"${ENV_N_JOBS} must be a positive integer, got {value!r}.") from None
    if n < 1:
        raise ValueError(f"${ENV_N_JOBS} must be a positive integer, got {value!r}.")
    return n


class Settings:
    """Package-wide settings of bitro_sc (the object ``bs.settings``).

    Examples
    --------
    >>> import bitro_sc as bs
    >>> bs.settings.n_jobs >= 1
    True
    >>> old = bs.settings.n_jobs
    >>> bs.settings.n_jobs = 1  # one thread for torch, numba and dask
    >>> bs.settings.n_jobs
    1
    >>> bs.settings.n_jobs = None  # back to the CPUs this process may use
    >>> bs.settings.n_jobs == bs._settings.available_cpus()
    True
    >>> bs.settings.n_jobs = old
    """

    def __init__(self) -> None:
        self._verbosity: str = "info"
        self._n_jobs: int | None = _env_n_jobs()
        if self._n_jobs is None and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            # the user's OpenMP setting stands when bitro_sc's own is unset
            self._n_jobs = max(1, int(os.environ["OMP_NUM_THREADS"]))

    @property
    def n_jobs(self) -> int:
        """Threads used by PyTorch, numba and dask; set an int, or ``None`` for the default (the
        CPUs this process may use, see :func:`available_cpus`; ``$BITRO_SC_N_JOBS`` at import)."""
        return self._n_jobs if self._n_jobs is not None else available_cpus()

    @n_jobs.setter
    def n_jobs(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`n_jobs` must be a positive int or None, got {value!r}.")
        self._n_jobs = value
        apply_threads()

    @property
    def verbosity(self) -> str:
        """Which log lines of bitro_sc are shown: ``"error"``, ``"warning"``, ``"info"`` (default:
        the steps run automatically and other notes) or ``"debug"``. Warnings of the
        :mod:`warnings` module are not affected."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: Literal["error", "warning", "info", "debug"]) -> None:
        from ._validate import check_choice

        self._verbosity = check_choice(value, VERBOSITIES, "verbosity")
        logging.getLogger("bitro_sc").setLevel(value.upper())

    def __repr__(self) -> str:
        return (
            f"bitro_sc settings: n_jobs={self.n_jobs} (CPUs available: {available_cpus()}), "
            f"verbosity={self.verbosity!r}"
        )


class _FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints bitro_sc's log lines to stderr only while the root logger has no handler of its own.

    A logger without handlers would drop INFO lines (Python's last-resort handler shows warnings
    only); an application that configures logging (``logging.basicConfig``, pytest's ``caplog``)
    gets the records through propagation instead, once, not twice.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            self.setStream(sys.stderr)  # the current stderr (Jupyter and pytest replace it)
            super().emit(record)


def init_logging() -> None:
    """The ``"bitro_sc"`` logger at :attr:`settings.verbosity <Settings.verbosity>`, with the
    fallback handler."""
    logger = logging.getLogger("bitro_sc")
    logger.setLevel(settings.verbosity.upper())
    if not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        handler = _FallbackHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bitro_sc: %(message)s"))
        logger.addHandler(handler)


settings = Settings()


def apply_threads() -> int:
    """Give PyTorch, numba and dask :attr:`settings.n_jobs <Settings.n_jobs>` threads.

    Libraries not imported yet get the value through their environment variables (read when they
    load); already-imported ones are set directly. Returns the number of threads.
    """
    n = settings.n_jobs
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    if "dask" in sys.modules:
        import dask

        dask.config.set(num_workers=n)
    return n


def init_process() -> None:
    """At ``import bitro_sc``: passive OpenMP waiting (when unset and before torch loads) and the threads."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    apply_threads()
    init_logging()
