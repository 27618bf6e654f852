from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bitro_sc import cli


def test_help_lists_the_commands_and_is_fast():
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from bitro_sc.cli import main; sys.exit(main(['--help']))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in out.stdout
    assert "run" in out.stdout
    code = "import sys, bitro_sc.cli; print(sorted(m for m in ('torch', 'spatialdata') if m in sys.modules))"
    lazy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert lazy.stdout.strip() == "[]"  # `bitro-sc --help` does not import the heavy stack


def test_demo_options_parse():
    args = cli._parser().parse_args(["demo", "--quick", "--out", "x", "--epochs", "2", "--n-slides", "3"])
    assert args.quick
    assert args.out == "x"
    assert args.epochs == 2
    assert args.n_slides == 3


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD_TOML = """
out = "results"
[data]
reader = "read_st"
slides = [{ image = "a.jpg", counts = "a.tsv", spots = "a_sel.tsv", sample_id = "A" }]
[steps]
run = ["segment", "cell_features", "phenotypes", "assign_cells", "cell_graph", "holdout"]
[params.segment]
method = "watershed"
[params.holdout]
test = ["A"]
methods = ["ridge", "mean"]
"""


def test_toml_config_is_validated_and_paths_resolved(tmp_path):
    for f in ("a.jpg", "a.tsv", "a_sel.tsv"):
        (tmp_path / f).write_text("")
    cfg = cli.load_config(_write(tmp_path, "run.toml", GOOD_TOML))
    assert cfg["out"] == str((tmp_path / "results").resolve())
    assert cfg["data"]["slides"][0]["image"] == str(tmp_path / "a.jpg")
    assert cfg["steps"][-1] == "holdout"
    assert cfg["params"]["segment"] == {"method": "watershed"}


def test_json_and_yaml_configs_give_the_same_result(tmp_path):
    pytest.importorskip("yaml")
    raw = {
        "data": {"reader": "synthetic", "n_slides": 3, "size_um": 300},
        "steps": {"run": ["segment", "cross_validate"]},
        "params": {"cross_validate": {"methods": ["ridge"]}},
    }
    import yaml

    a = cli.load_config(_write(tmp_path, "c.json", json.dumps(raw)))
    b = cli.load_config(_write(tmp_path, "c.yaml", yaml.safe_dump(raw)))
    assert a == b
    assert a["data"]["kwargs"] == {"n_slides": 3, "size_um": 300}


def test_config_errors_name_every_problem(tmp_path):
    bad = """
    colour = "red"
    [data]
    reader = "read_st"
    slides = [{ image = "missing.jpg", counts = "c.tsv", spots = "s.tsv" }]
    [steps]
    run = ["cell_graph", "segment", "train"]
    [params.cross_validate]
    methods = ["bitro", "lasso"]
    """
    with pytest.raises(cli.ConfigError) as info:
        cli.load_config(_write(tmp_path, "bad.toml", bad))
    msg = str(info.value)
    for fragment in (
        "unknown top-level key(s) ['colour']",
        "missing.jpg' does not exist",
        "unknown step(s) ['train']",
        "in the order",
        "'cross_validate' is not in steps.run",
        "unknown ['lasso']",
    ):
        assert fragment in msg
    with pytest.raises(cli.ConfigError, match=r"needs params\.holdout\.test"):
        cli.validate_config({"data": {"reader": "synthetic"}, "steps": ["holdout"]})
    with pytest.raises(cli.ConfigError, match=r"data\.reader must be one of"):
        cli.validate_config({"data": {"reader": "read_csv"}, "steps": ["segment"]})
    with pytest.raises(cli.ConfigError, match="invalid TOML"):
        cli.load_config(_write(tmp_path, "x.toml", "data = ["))
    with pytest.raises(cli.ConfigError, match="Unknown config format"):
        cli.load_config(_write(tmp_path, "x.ini", ""))


def test_main_returns_2_and_prints_the_problem_for_a_bad_config(tmp_path, capsys):
    path = _write(tmp_path, "bad.json", json.dumps({"data": {"reader": "nope"}, "steps": ["segment"]}))
    assert cli.main(["run", str(path)]) == 2
    assert "data.reader must be one of" in capsys.readouterr().err
    good = _write(tmp_path, "good.json", json.dumps({"data": {"reader": "synthetic"}, "steps": ["segment"]}))
    assert cli.main(["run", str(good), "--dry-run"]) == 0
    assert '"reader": "synthetic"' in capsys.readouterr().out


@pytest.mark.slow
def test_run_config_cross_validates_baselines_on_synthetic_slides(tmp_path):
    raw = {
        "out": "res",
        "data": {"reader": "synthetic", "n_slides": 3, "size_um": 300, "n_genes": 40, "seed": 1},
        "steps": {
            "run": ["segment", "cell_features", "phenotypes", "assign_cells", "cell_graph", "cross_validate"]
        },
        "params": {
            "cell_features": {"progress": False},
            "cross_validate": {"methods": ["ridge", "mean"], "top_hvg": 20},
        },
        "progress": False,
    }
    cfg = _write(tmp_path, "cv.json", json.dumps(raw))
    assert cli.main(["run", str(cfg)]) == 0
    df = pd.read_csv(tmp_path / "res" / "cross_validate.csv")
    assert set(df["method"]) == {"ridge", "mean"}
    assert df["test_group"].nunique() == 3
    summary = json.loads((tmp_path / "res" / "cross_validate_summary.json").read_text())
    assert summary["ridge"]["n_folds"] == 3


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_writes_metrics_and_figure(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "bitro" in printed
    assert "ridge" in printed
    assert "hest_score" in printed
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert set(summary["methods"]) == {"bitro", "ridge", "mean"}
    assert summary["test"] == ["S2"]
    assert summary["train"] == ["S0", "S1"]
    spot = pd.read_csv(tmp_path / "demo_spot_metrics.csv")
    assert spot.groupby("method")["gene"].nunique().to_dict() == {"bitro": 50, "mean": 50, "ridge": 50}
    assert spot.loc[spot["method"] == "ridge", "pearson"].mean() > 0.1  # a real signal on held-out spots
    cell = pd.read_csv(tmp_path / "demo_cell_metrics.csv")
    assert cell["pearson"].notna().sum() > 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_writes_to_a_new_temporary_folder_by_default():
    args = cli._parser().parse_args(["demo"])
    assert args.out is None  # nothing is written into the working directory unless asked
