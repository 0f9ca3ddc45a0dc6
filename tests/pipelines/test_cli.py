"""The generated CLI: every command prints its settings (--print-config), reads them back (--config), shows
the config classes' defaults in its help in dashed spellings, refuses bad config files with one line naming
the key, and with --json prints only the JSON document on stdout."""

import http.server
import inspect
import json
import re
import subprocess
import sys
import threading
from dataclasses import asdict, fields

import pytest
import yaml

from pipelines import arguments, cli
from pipelines.config import CONFIGS, RunConfig, Table1Config, TrainConfig, TuneCommand, TuneConfig, from_file
from pipelines.core import console
from pipelines.tracking.runs import flatten
from tests.helpers import error_line
from tests.helpers import segnet_here as segnet  # a new Python for each would import torch each time

CONFIG_COMMANDS = {
    "train": TrainConfig(),
    "tune": TuneConfig(),
    "run": from_file(RunConfig, CONFIGS / "small.yaml"),
    "experiment table1": from_file(Table1Config, CONFIGS / "table1-cpu.yaml"),
}


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one help line per option


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
            assert "_" not in found[1], found[1]  # the spelling people type: --batch-size
            shown[found[1].replace("-", "_")] = yaml.safe_load(found[2])
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


def test_the_bayesian_profile_is_the_papers_training_recipe():
    cfg = from_file(TrainConfig, CONFIGS / "bayesian.yaml", data="shards")
    assert (cfg.model, cfg.dropout, cfg.lr, cfg.batch_size, cfg.image_size) == (
        "segnet",
        0.5,
        1e-3,
        4,
        "360x480",
    )
    assert printed("train", "--config", str(CONFIGS / "bayesian.yaml"))["dropout"] == 0.5


@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_table1_profiles_are_table1_configs(name):
    cfg = from_file(Table1Config, CONFIGS / f"table1-{name}.yaml")
    assert cfg.label == name and cfg.tune.train.metric == "val_global_accuracy"
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
    assert message in error_line(r, only=True), r.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()  # nothing ran


def test_nested_config_errors_name_the_nested_key(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("train:\n  bogus: 1\n")
    r = segnet("tune", "--config", str(file))
    assert "'bogus'" in error_line(r, only=True)


def test_dashes_prefixes_and_bare_flags_are_accepted():
    argv = [
        "--batch-size",
        "6",
        "--amp",
        "--no-channels-last",
        "--num-samples=3",
        "--class-weighting",
        "none,x",
    ]
    assert arguments.normalize(argv, TuneCommand) == [
        "--train.batch_size",
        "6",
        "--train.amp",
        "true",
        "--train.channels_last",
        "false",
        "--num_samples=3",
        "--class_weighting",
        "[none,x]",
    ]


def test_the_spellings_people_type_reach_the_settings():
    assert printed("registry", "show", "m@champion")["ref"] == "m@champion"  # a bare argument: the positional
    assert printed("serve", "models:/m/2", "--max-batch-size", "8")["model"] == "models:/m/2"
    assert printed("submit", "--no-wait")["wait"] is False
    settings = printed(
        "bench", "model", "--no-channels-last", "--amp", "--compile", "on", "--compile-mode", "max-autotune"
    )
    assert (settings["channels_last"], settings["amp"]) == (False, True)
    assert (settings["compile"], settings["compile_mode"]) == ("on", "max-autotune")


def test_compile_means_the_same_for_every_command():
    """auto | on | off, as for train; torch.compile's own mode is a separate setting of the bench."""
    commands = (["train", "--data", "x"], ["evaluate", "--data=x", "--checkpoint=c"], ["bench", "model"])
    for args in commands:
        r = segnet(*args, "--compile", "max-autotune")
        assert r.returncode == 2 and "compile 'max-autotune': choose one of auto, on, off" in r.stderr, args


def test_table1_takes_no_profile_option(tmp_path):
    """--profile was the report's label and ran the cpu grid whatever it said: now it is refused, one line."""
    r = segnet("experiment", "table1", "--profile", "smoke", cwd=tmp_path)
    assert "--profile" in error_line(r, only=True), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_required_setting_is_one_line_naming_it(tmp_path):
    for args, key in (
        (["prepare"], "out"),
        (["registry", "show"], "ref"),
        (["predict", "--input", "x"], "output"),
    ):
        r = segnet(*args, cwd=tmp_path)
        error_line(r, only=True)
        assert f"error: {key} is required" in r.stderr, r.stderr


JSON_COMMANDS = sorted(
    name for name, cmd in cli.COMMANDS.items() if "json" in {f.name for f in fields(cmd.config)}
)


def test_the_commands_with_json_are_the_ones_tested_here_or_where_they_run():
    """models, registry list and bench serve run here; the others' --json runs where their data is made:
    train and evaluate in test_bucket_runs, tune and registry promote in test_tune, registry show in
    test_registry, export in
    test_export, bench data, storage, train and scale in test_bench, bench model in test_reference."""
    assert JSON_COMMANDS == sorted(
        ["models", "train", "tune", "evaluate", "export"]
        + ["registry list", "registry show", "registry promote"]
        + ["bench data", "bench storage", "bench train", "bench model", "bench scale", "bench serve"]
    )


def test_models_json_is_the_only_thing_on_stdout():
    r = segnet("models", "--json")
    assert r.returncode == 0 and {row["name"] for row in json.loads(r.stdout)} >= {"segnet", "segnet-basic"}
    assert "parameters" in segnet("models").stdout.splitlines()[0]  # a table for a person


def test_registry_list_json_is_the_only_thing_on_stdout(tmp_path):
    r = segnet("registry", "list", "--json", "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


class Answers(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_bench_serve_json_is_the_only_thing_on_stdout(camvid_dir, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url, image = f"http://127.0.0.1:{server.server_port}", sorted((camvid_dir / "test").glob("*.png"))[0]
        args = ["--url", url, "--image", str(image), "--clients", "2", "--requests", "2", "--plot", ""]
        r = segnet("bench", "serve", *args, "--json", cwd=tmp_path)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["requests"] == 4 and json.loads(r.stdout)["errors"] == 0


def test_with_json_what_child_processes_print_goes_to_stderr(capfd):
    """Ray's and Serve's lines ("Ray dashboard: ...", "serving ...") come from this process and its
    children: with --json, both reach stderr, and stdout opens with the JSON document."""
    with console.json_only(True):
        print("serving m v1")
        subprocess.run([sys.executable, "-c", "print('Ray dashboard: http://127.0.0.1:8265')"], check=True)
    print("{}")
    out, err = capfd.readouterr()
    assert out == "{}\n" and "serving m v1" in err and "Ray dashboard" in err


def test_unknown_command_shows_the_commands():
    r = segnet("fly")
    assert r.returncode == 2 and "experiment table1" in r.stderr
    assert segnet("--help").returncode == 0


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_command_is_one_config_class_and_a_short_handler(name):
    command = cli.COMMANDS[name]
    assert arguments.summary(command.config), name  # its help line
    source = inspect.getsource(command.run).splitlines()
    assert len(source) <= 12, (name, len(source))
