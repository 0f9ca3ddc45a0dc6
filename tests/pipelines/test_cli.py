"""The generated CLI: every command prints its settings (--print-config), reads them back (--config), shows
the config classes' defaults in its help, and refuses bad config files with one line naming the key."""

import contextlib
import io
import os
import re
import subprocess
from dataclasses import asdict

import pytest
import yaml

from pipelines import cli
from pipelines.config import CONFIGS, RunConfig, Table1Config, TrainConfig, TuneConfig, from_file
from pipelines.tracking import flatten

CONFIG_COMMANDS = {
    "train": TrainConfig(),
    "tune": TuneConfig(),
    "run": from_file(RunConfig, CONFIGS / "small.yaml"),
    "experiment table1": from_file(Table1Config, CONFIGS / "table1-cpu.yaml"),
}


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one help line per option


def segnet(*args, cwd=None):
    """`segnet ARGS` in this process (a new Python for each would import torch each time)."""
    out, err = io.StringIO(), io.StringIO()
    cwd_before, env_before = os.getcwd(), dict(os.environ)  # main() sets the console's variables
    try:
        os.chdir(cwd or cwd_before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # --help and --print-config exit
                code = e.code or 0
    finally:
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env_before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def printed(*args) -> dict:
    r = segnet(*args, "--print-config")
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def help_defaults(name: str) -> dict:
    """{option: default} as `segnet NAME --help` shows them."""
    r = segnet(*name.split(), "--help")
    assert r.returncode == 0, r.stderr
    shown = {}
    for block in re.split(r"\n(?=  -|\S)", r.stdout):  # a block per option, its help maybe on the next line
        found = re.match(r"\s*--(\S+) .*\(type: .*?, default: (.*)\)\s*$", " ".join(block.split()))
        if found:
            shown[found[1]] = yaml.safe_load(found[2])
    return shown


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_command_prints_its_config_and_reads_it_back(name, tmp_path):
    settings = printed(*name.split())
    assert settings, name
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump(settings))
    assert printed(*name.split(), "--config", str(file)) == settings
    shown = help_defaults(name)
    for key, value in flatten(settings).items():
        if key in shown:  # every option with a value type shows its default: the same one
            assert shown[key] == value, (name, key)
    assert len(shown) >= len(flatten(settings)) // 2, name


@pytest.mark.parametrize("name, expected", CONFIG_COMMANDS.items())
def test_config_commands_default_to_their_config_classes(name, expected):
    """The CLI's defaults are the config classes' (for run and Table 1, with their default profile)."""
    settings = printed(*name.split())
    for key, value in flatten(asdict(expected)).items():
        assert settings_value(settings, key) == value, (name, key)
    shown = help_defaults(name)
    for key, value in flatten(asdict(expected)).items():
        assert shown[key] == value, (name, key)


def settings_value(settings: dict, key: str):
    for part in key.split("."):
        settings = settings[part]
    return settings


def test_a_config_file_sets_values_and_a_flag_overrides_one(tmp_path):
    file = tmp_path / "small.yaml"
    file.write_text("epochs: 7\nbatch_size: 6\nmodel: segnet\n")
    settings = printed("train", "--config", str(file), "--epochs", "2")
    assert (settings["epochs"], settings["batch_size"], settings["model"]) == (2, 6, "segnet")
    file.write_text("num_samples: 6\ntrain:\n  epochs: 7\n  image_size: 90x120\n")
    search = printed("tune", "--config", str(file), "--epochs", "2")
    assert search["train"]["epochs"] == 2  # a train setting reached through the search's train config
    assert (search["num_samples"], search["train"]["image_size"]) == (6, "90x120")


@pytest.mark.parametrize("name", ["small.yaml", "paper.yaml"])
def test_run_profiles_are_run_configs(name):
    cfg = from_file(RunConfig, CONFIGS / name)
    assert cfg.tune.train.image_size in ("90x120", "360x480") and cfg.tune.num_samples >= 4


@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_table1_profiles_are_table1_configs(name):
    cfg = from_file(Table1Config, CONFIGS / f"table1-{name}.yaml")
    assert cfg.profile == name and cfg.tune.train.metric == "val_global_accuracy"
    assert cfg.tune.lr_min == cfg.tune.lr_max == 0.1 and cfg.tune.train.batch_size in (4, 12)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 5\nbogus: 1\n", "'bogus' is not accepted"),
        ("epochs: five\n", "Parser key \"epochs\": Expected a <class 'int'>. Got value: five"),
        ("epochs: 0\n", "epochs 0: must be at least 1"),
        ("model: segnet-xl\n", "model 'segnet-xl': choose one of"),
        ("epochs: !!python/object/apply:os.system ['touch PWNED']\n", "could not determine a constructor"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, text, message):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    r = segnet("train", "--config", str(file), "--data", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()  # nothing ran


def test_nested_config_errors_name_the_nested_key(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("train:\n  bogus: 1\n")
    r = segnet("tune", "--config", str(file))
    assert r.returncode == 2 and "'bogus'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dashes_prefixes_and_bare_flags_are_accepted():
    parser = cli.build_parser("tune")
    argv = cli.normalize(["--batch-size", "6", "--amp", "--no-channels-last", "--num-samples=3"], parser)
    assert argv == [
        "--train.batch_size",
        "6",
        "--train.amp",
        "true",
        "--train.channels_last",
        "false",
        "--num_samples=3",
    ]


def test_unknown_command_shows_the_commands():
    r = segnet("fly")
    assert r.returncode == 2 and "experiment table1" in r.stderr
    assert segnet("--help").returncode == 0
