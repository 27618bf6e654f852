"""Development sessions: ``nox -s tests | lint | docs | bench | demo``.

PyTorch is installed first, as the README says: ``torch==2.13.0`` from PyTorch's CPU index (set
``BITRO_SC_TORCH`` to another requirement, e.g. a CUDA build's, to change it).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = os.environ.get("BITRO_SC_TORCH", "torch==2.13.0")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH, "--extra-index-url", CPU_INDEX)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff", "mypy")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    _install(session, "docs")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """``nox -s bench [-- --quick]``: one run, one results file (benchmarks/bench_report.py);
    ``nox -s bench -- segmentation features`` runs those single benchmarks instead."""
    _install(session, "test")
    session.install("squidpy")  # the peers measured in the same run
    if session.posargs and not session.posargs[0].startswith("-"):
        for name in session.posargs:
            session.run("python", f"benchmarks/bench_{name}.py")
        return
    session.run("python", "benchmarks/bench_report.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    _install(session, "test")
    session.run("bitro-sc", "demo", *session.posargs)
