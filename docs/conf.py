"""Sphinx configuration of the bitro_sc documentation (``nox -s docs``; warnings are errors).

The API pages (``docs/api/*.md``) hold a marker line ``% api: <module>``; at build time it is
replaced by a summary table and the documentation of every public name of that module that can
be imported. Names whose module is not written yet are listed as "not available yet" instead of
breaking the build.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import bitro_sc  # noqa: E402

# The executed tutorials live in the repository's tutorials/ folder; sphinx only reads sources
# below docs/, so they are copied into docs/tutorials/ (git-ignored) on every build.
_TUTORIALS = ROOT / "docs" / "tutorials"
_TUTORIALS.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "tutorials").glob("[0-9]*.ipynb")):
    (_TUTORIALS / _nb.name).write_bytes(_nb.read_bytes())

project = "bitro_sc"
author = "bitro_sc developers"
copyright = "2026, bitro_sc developers"
version = release = bitro_sc.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# --- sources --------------------------------------------------------------------------------
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_static/*.py", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are stored with their outputs; never executed here

# --- autodoc --------------------------------------------------------------------------------
autosummary_generate = False  # the API pages document functions in place (see `_api_block`)
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
# Our "Returns" sections are free text (what is returned and written where), not "name : type"
# entries: render them as a plain section so that wrapped lines stay one paragraph.
napoleon_custom_sections = ["Returns"]
typehints_document_rtype = True
typehints_use_signature = False
always_document_param_types = False
# Forward references that only exist under TYPE_CHECKING (SpatialData, AnnData, Axes, ...) cannot
# be resolved at documentation time; that is expected and not an error.
suppress_warnings = ["sphinx_autodoc_typehints.forward_reference", "sphinx_autodoc_typehints.guarded_import"]

# --- output ---------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"bitro_sc {version}"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/bitro-sc/bitro_sc",
    "use_repository_button": True,
    "show_toc_level": 2,
}

# --- generated API blocks -------------------------------------------------------------------
_MARKER = re.compile(r"^% api: (?P<module>[\w.]+)\s*$", re.MULTILINE)


def _api_block(module_name: str) -> str:
    """RST (in an eval-rst fence) documenting every importable public name of ``module_name``."""
    module = importlib.import_module(module_name)
    names = list(getattr(module, "__all__", []))
    available, missing = [], []
    for name in names:
        try:
            obj = getattr(module, name)
        except (ImportError, AttributeError) as err:  # a module still being written
            missing.append(f"``{name}`` ({type(err).__name__}: {err})")
            continue
        available.append((name, obj))
    lines = ["```{eval-rst}", f".. currentmodule:: {module_name}", ""]
    if available:
        lines += [".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {name}" for name, _ in available]
        lines.append("")
    for name, obj in available:
        if inspect.isclass(obj):
            directive = "autoclass"
        elif inspect.isroutine(obj):
            directive = "autofunction"
        else:
            directive = "autodata"
        lines += [f".. {directive}:: {name}", ""]
        if directive == "autodata":
            lines += ["   :no-value:", ""]
        if directive == "autoclass":
            lines += ["   :members:", ""]
    if missing:
        lines += [".. note::", "   Not available in this build yet: " + "; ".join(missing), ""]
    lines.append("```")
    return "\n".join(lines)


def _fill_api(app, docname: str, source: list[str]) -> None:
    if docname.startswith("api"):
        source[0] = _MARKER.sub(lambda m: _api_block(m.group("module")), source[0])


def setup(app):
    app.connect("source-read", _fill_api)
    return {"parallel_read_safe": True}
