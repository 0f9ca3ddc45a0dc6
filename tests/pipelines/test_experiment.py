import csv
import json
import math
import re
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import CONFIGS, Table1Config, from_file
from pipelines.core.table1 import check_conclusions
from pipelines.search.experiment import run_table1
from segnet import SegNetError, build_model
from segnet.models import MODELS, count_parameters
from segnet.paper import PAPER_TABLE1
from tests.helpers import error_line, mlflow_store

FULL_PAPER = {v: {m: PAPER_TABLE1[v][m] for m in ("median_frequency", "none")} for v in PAPER_TABLE1}


def test_paper_table_names_every_decoder_variant_with_its_parameter_count():
    assert set(PAPER_TABLE1) == set(MODELS) - {"segnet"}
    for name, paper in PAPER_TABLE1.items():
        ours = count_parameters(build_model(name, num_classes=11)) / 1e6
        assert ours == pytest.approx(paper["params_m"], rel=0.025), name


def test_the_paper_figures_pass_the_paper_conclusions():
    assert [c["verdict"] for c in check_conclusions(FULL_PAPER)] == [True, True, True]


def test_conclusions_fail_when_the_numbers_say_otherwise():
    table = {v: dict(s) for v, s in FULL_PAPER.items()}
    table["bilinear-interpolation"] = {m: (99.0, 99.0, 99.0, 99.0) for m in ("median_frequency", "none")}
    table["fcn-basic"] = {m: (99.0, 99.0, 99.0, 99.0) for m in ("median_frequency", "none")}
    for v in table:  # natural frequency better everywhere
        table[v]["none"] = tuple(x + 5 for x in table[v]["median_frequency"])
    assert [c["verdict"] for c in check_conclusions(table)] == [False, False, False]


def test_conclusions_are_not_tested_without_the_variants_they_need():
    table = {"segnet-basic": {"median_frequency": FULL_PAPER["segnet-basic"]["median_frequency"]}}
    assert [c["verdict"] for c in check_conclusions(table)] == [None, None, None]


def test_unknown_variant_is_refused_by_name():
    with pytest.raises(SegNetError, match="variants 'segnet-huge'"):
        Table1Config(variants=["segnet-basic", "segnet-huge"])


def profile(profile_name: str, tmp_path, **train) -> Table1Config:
    """A Table 1 profile from configs/, writing into tmp_path."""
    train = {"storage_path": str(tmp_path / "runs"), "mlflow_uri": mlflow_store(tmp_path / "m.db"), **train}
    return from_file(
        Table1Config,
        CONFIGS / f"table1-{profile_name}.yaml",
        out=str(tmp_path / "report"),
        tune={"train": train},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "[segnet-basic,segnet-huge]"], "variants 'segnet-huge'"),
        (["--class-weighting", "[inverse_frequency]"], "choose one of median_frequency, none"),
        (["--config", "configs/huge.yaml"], "does not exist"),
    ],
)
def test_cli_refuses_a_bad_grid_before_starting_anything(args, message, tmp_path, segnet_cli):
    r = segnet_cli("experiment", "table1", "--data", tmp_path / "x", *args, timeout=120)
    error_line(r)
    assert message in r.stderr
    assert not (tmp_path / "x").exists()  # nothing prepared, nothing written


@pytest.fixture
def shards(shards_12):
    """The session's 12-image shards (tests/conftest.py), read-only."""
    return shards_12


@pytest.mark.slow
def test_paper_profile_without_gpus_is_refused_before_any_trial(shards, tmp_path):
    cfg = replace(profile("paper", tmp_path, data=str(shards)), variants=["segnet-basic"])
    with pytest.raises(SegNetError, match="GPUs"):
        run_table1(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "report").exists()


@pytest.mark.slow
def test_smoke_profile_reports_figures_that_came_from_the_run(shards, tmp_path):
    cfg = profile("smoke", tmp_path, data=str(shards), name="t1")
    uri = cfg.tune.train.mlflow_uri
    summary = run_table1(cfg)
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} >= {"table1.md", "table1.csv", "table1.png", "table1.json"}
    assert (out / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "table1.csv")))
    assert sorted((r["variant"], r["balancing"]) for r in rows) == sorted(
        (v, m) for v in ("segnet-basic", "bilinear-interpolation") for m in ("median_frequency", "none")
    )
    client = MlflowClient(tracking_uri=uri)
    md = (out / "table1.md").read_text()
    for r in rows:
        # every score is the trial's own test score, as logged to its MLflow run
        trial = next(
            t for t in summary["rows"] if (t["variant"], t["balancing"]) == (r["variant"], r["balancing"])
        )
        logged = client.get_run(trial["mlflow_run_id"]).data.metrics
        for measure, key in (
            ("G", "global_accuracy"),
            ("C", "class_accuracy"),
            ("mIoU", "miou"),
            ("BF", "bf"),
        ):
            assert float(r[measure]) == pytest.approx(100 * logged[f"test_{key}"])
            assert f"{float(r[measure]):.1f} / {r['paper_' + measure]}" in md
        assert float(r["params_m"]) == pytest.approx(
            count_parameters(build_model(r["variant"], num_classes=11)) / 1e6
        )
        assert float(r["infer_ms"]) > 0 and math.isfinite(float(r["infer_ms"]))
        assert int(r["epochs"]) == 1
    assert not re.search(r"\b(nan|inf|todo|tbd)\b", md, re.IGNORECASE)
    assert md.count("reproduced here") + md.count("not tested here") == 3
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "table1")} >= {
        "table1/table1.md",
        "table1/table1.csv",
        "table1/table1.png",
    }
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    for child in children:  # each trial's run ended with its plots, by itself or by the experiment
        assert child.info.status == "FINISHED", child.info.run_name
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert "plots/training_curves.png" in plots, child.info.run_name
    assert json.loads((out / "table1.json").read_text())["info"]["profile"] == "smoke"
