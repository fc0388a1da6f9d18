"""Command-line flags of every `launch/` script: one parser that names an unknown config key.

`--config.train.foo=1` (a key the config does not have) makes ml_collections' config flag raise a
bare `AttributeError: "'foo'"` while absl parses the flags. `parse_flags`, which every launch script
hands to `app.run(main, flags_parser=parse_flags)`, turns it into one line naming the key, the keys
its section has and the closest one, and exits as absl does for any bad flag (status 1). A config
defined inline (`config_flags.DEFINE_config_dict`, e.g. launch/reproduce.py's `--set`) takes its
overrides the same way, `--set.KEY=VALUE`, and also as `--set=KEY=VALUE`. Imports absl and
ml_collections only: no training machinery.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags.config_flags import is_config_flag  # public, not re-exported


def _is_section(value: Any) -> bool:
    return isinstance(value, (config_dict.ConfigDict, dict))


def _is_inline(flag: Any) -> bool:
    """A config flag defined with its ConfigDict (`DEFINE_config_dict`), not read from a file."""
    return is_config_flag(flag) and isinstance(flag.default, config_dict.ConfigDict)


def expand_inline_overrides(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS,
                            names: Sequence[str] = ()) -> list[str]:
    """`argv` with `--NAME=KEY=VALUE` and `--NAME KEY=VALUE` of an inline config flag NAME (or of `names`)
    written as ml_collections reads an override, `--NAME.KEY=VALUE`."""
    inline = list(names) or [name for name in list(flag_values) if _is_inline(flag_values[name])]
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        match = next((m for name in inline if (m := re.fullmatch(rf"--?({re.escape(name)})(=(.*))?", arg))), None)
        value = None if match is None else (match.group(3) if match.group(2) else
                                            (argv[i + 1] if i + 1 < len(argv) else None))
        if value is not None and "=" in value:
            out.append(f"--{match.group(1)}.{value}")
            i += 1 if match.group(2) else 2
            continue
        out.append(arg)
        i += 1
    return out


def _config_argument(name: str, argv: Sequence[str]) -> str | None:
    """The value given to --NAME (as --NAME=V or --NAME V), the last one winning as in absl."""
    value = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
        if match:
            value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def unknown_override(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> str | None:
    """What is wrong with the first `--<config flag>.<path>=...` override whose path the config lacks,
    or None if every override names a key the config has."""
    for name in list(flag_values):
        flag = flag_values[name]
        if not is_config_flag(flag):
            continue
        overrides = [m.group(1) for arg in argv
                     if (m := re.match(rf"--?{re.escape(name)}\.([^=\s]+)", arg))]
        if not overrides:
            continue
        argument = _config_argument(name, argv)
        if _is_inline(flag):
            config = flag.default
        elif argument is None:
            return f"--{name}.{overrides[0]} is given but --{name} (the config file) is not"
        else:
            try:
                config = flag.parser.parse(argument)
            except Exception:  # the config file itself is the problem: absl's own error says which
                return None
        problem = _unknown_key(name, config, overrides)
        if problem:
            return problem
    return None


def _unknown_key(name: str, config: Any, overrides: Sequence[str]) -> str | None:
    """What is wrong with the first override path (under config flag `name`) that `config` lacks."""
    for path in overrides:
        node, parts = config, path.split(".")
        for depth, part in enumerate(parts):
            section = ".".join([name, *parts[:depth]])
            if "[" in part or not _is_section(node):
                if not _is_section(node):
                    return (f"unknown key {name}.{path}: {section} is a value ({type(node).__name__}), "
                            "not a section with keys")
                break  # an indexed path: leave it to ml_collections
            if part not in node:
                keys = sorted(node.keys())
                close = difflib.get_close_matches(part, keys, n=1)
                return (f"unknown key {name}.{path}: {section} has no key {part!r}"
                        + (f" (did you mean {section}.{close[0]}?)" if close else "")
                        + f". Known keys of {section}: {', '.join(keys)}")
            node = node[part]
    return None


def define_inline_config(name: str, config: config_dict.ConfigDict, help_string: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_dict(name, config)` taking `--NAME.KEY=VALUE` overrides (and
    `--NAME=KEY=VALUE`), with an unknown key named as `parse_flags` names it (the overrides of an inline
    config are read from the command line when the flag is defined)."""
    argv = expand_inline_overrides(sys.argv, names=(name,))
    problem = _unknown_key(name, config, [m.group(1) for arg in argv
                                          if (m := re.match(rf"--?{re.escape(name)}\.([^=\s]+)", arg))])
    if problem:
        sys.stderr.write(f"FATAL Flags parsing error: {problem}\n")
        sys.exit(1)
    holder = config_flags.DEFINE_config_dict(name, config, help_string, sys_argv=argv)
    caller = sys._getframe(1).f_globals.get("__name__", "")  # listed with the script's flags (--helpshort)
    flags.FLAGS.register_flag_by_module(sys.argv[0] if caller == "__main__" else caller, flags.FLAGS[name])
    return holder


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (usage message and exit 1 on a bad flag), with an unknown config key named."""
    argv = expand_inline_overrides(argv)  # as `define_inline_config` read them
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
