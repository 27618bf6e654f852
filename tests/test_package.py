import subprocess
import sys

import pytest

from bitro_sc._registry import Registry


def test_import_is_lazy_and_does_not_load_heavy_dependencies():
    heavy = "('torch', 'spatialdata', 'torch_geometric')"
    code = f"import sys, bitro_sc; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_namespaces_expose_the_design_names():
    import bitro_sc as bs

    for mod, names in {
        "io": ["read_visium", "read_st", "read_hest", "read_wsi", "read_bulk"],
        "tl": [
            "segment",
            "cell_features",
            "phenotypes",
            "assign_cells",
            "cell_graph",
            "fit_bitro",
            "predict_bitro",
            "cross_validate",
            "fit_baseline",
            "evaluate",
        ],
        "pl": ["expression", "cells", "gene_correlation", "history"],
        "datasets": ["synthetic"],
    }.items():
        assert set(names) <= set(dir(getattr(bs, mod)))


def test_registry_lists_names_in_unknown_name_error():
    reg = Registry[int]("widget")
    reg.register("a", 1)
    reg.register_prefix("num", lambda arg: int(arg))
    assert reg.get("a") == 1
    assert reg.get("num:7") == 7
    assert reg.get(5) == 5  # an object that is already a backend passes through
    with pytest.raises(ValueError, match=r"Unknown widget 'b'.*Registered: a, num:<name>"):
        reg.get("b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
