"""The command line of a config class: jsonargparse's parser, and the spellings people type.

jsonargparse names an option after its field (`--batch_size`), wants a value for a true/false option
(`--amp true`), a list in brackets (`[a,b]`) and a nested setting's full key (`--train.epochs`). `normalize`
rewrites what people type (`--batch-size`, `--amp`, `--no-channels-last`, `a,b`, `--epochs` for
`--train.epochs`) into those, from the config class's own fields and types: no parser internals. The help
shows the dashed spellings.
"""

import inspect
import re
import typing
from dataclasses import fields, is_dataclass

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings


def summary(cls: type) -> str:
    """A command's one-line help: the first paragraph of its config class's docstring."""
    return " ".join(inspect.getdoc(cls).split("\n\n")[0].split())


def usage(doc: str, commands: dict[str, type]) -> str:
    """`segnet --help`: the CLI's docstring and each command (name -> config class) with its one line."""
    text = ["usage: segnet [-v] COMMAND [--config FILE] [--print-config] [options]", "", doc, "commands:"]
    text += [f"  {name:<20} {summary(config)}" for name, config in commands.items()]
    return "\n".join(text) + "\n\n`segnet COMMAND --help` shows a command's options and their defaults."


def dashed(text: str) -> str:
    return re.sub(r"--[\w.]+", lambda m: m[0].replace("_", "-"), text)


class Parser(ArgumentParser):
    """jsonargparse's parser, with its help in the spellings people type: `--batch-size`."""

    def format_help(self) -> str:
        return dashed(super().format_help())

    def format_usage(self) -> str:
        return dashed(super().format_usage())


def build_parser(cls: type, prog: str, profile: str | None = None) -> Parser:
    """The parser of one config class: --config, --print-config and its settings, with `profile` (a YAML
    file in configs/) read first."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings as help
    p = Parser(
        prog=prog,
        description=inspect.getdoc(cls),
        exit_on_error=False,
        print_config="--print_config",
        default_config_files=[profile] if profile else [],
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of settings (profiles: configs/)")
    p.add_class_arguments(cls, nested_key=None, as_group=False)
    return p


def option_types(cls: type, prefix: str = "") -> dict[str, type]:
    """{--key: type} of every setting of `cls`, a nested config's under its dotted prefix."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in fields(cls):
        kind = hints[f.name]
        found.update(
            option_types(kind, f"{prefix}{f.name}.") if is_dataclass(kind) else {f"--{prefix}{f.name}": kind}
        )
    return found


def normalize(argv: list[str], cls: type, positional: str | tuple[str, ...] | None = None) -> list[str]:
    """The spellings people type, as jsonargparse reads them, knowing only the config class's fields:
    --batch-size -> --batch_size; --epochs -> --train.epochs when only a nested config has it (the
    shallowest); a true/false option alone -> true; --no-X -> --X false; a list as a,b (or one item) ->
    [a,b]; bare arguments -> `--POSITIONAL ARG`, one setting of `positional` each, in order (`segnet serve
    models:/m@champion`); the last one takes any further."""
    kinds = option_types(cls)
    flags = {o for o, kind in kinds.items() if kind is bool}
    lists = {o for o, kind in kinds.items() if typing.get_origin(kind) is list}

    def resolve(key: str) -> str:
        nested = sorted((o.count("."), o) for o in kinds if o.endswith("." + key[2:]))
        return key if key in kinds or not nested else nested[0][1]

    def listed(key: str, value: str) -> str:
        return f"[{value}]" if key in lists and value and not value.startswith("[") else value

    out, takes_value = [], False
    unset = [positional] if isinstance(positional, str) else list(positional or ())
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            if takes_value:
                out.append(listed(out[-1], arg))
            else:
                setting = (unset[0] if len(unset) == 1 else unset.pop(0)) if unset and arg != "-h" else None
                out += [f"--{setting}", arg] if setting else [arg]
            takes_value = False
            continue
        key, eq, value = arg.partition("=")
        key = resolve("--" + key[2:].replace("-", "_"))
        negated = resolve(f"--{key[5:]}") if key.startswith("--no_") else ""
        follows = argv[i + 1] if i + 1 < len(argv) else "--"
        bare = not eq and follows.lower() not in ("true", "false", "yes", "no")
        if not eq and negated in flags:
            out += [negated, "false"]
        elif key in flags and bare:
            out += [key, "true"]
        else:
            out.append(key + eq + listed(key, value))
        takes_value = not eq and out[-1] == key and key not in ("--print_config", "--help")
    return out
