"""One configuration mechanism for every script: a schema of options, a YAML file, flags.

Each script declares its options once (name, default, type, help). From that schema come the
command-line flags (``batch_size`` -> ``--batch-size``), the ``--help`` text and the check of YAML
files. Precedence: schema default < ``--config`` YAML file < command-line flag. An unknown YAML key
or flag is an error, never silently ignored. An option's ``check`` (e.g. :func:`at_least`,
:func:`multiple_of`) is applied to its resolved value, from whichever source, before the script
does any work: ``--image-size 33`` is one error naming the flag, not a traceback from the network.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import yaml

from .errors import ConfigError
from .files import atomic_write_text


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None  # parser of a flag's text; inferred from default if None
    choices: Sequence[Any] | None = None
    repeatable: bool = False  # a list: --x a b c (or --x a --x b), or a YAML list
    in_file: bool = True  # False for options of one invocation (--resume, --device): not in YAML
    check: Callable[[Any], str | None] | None = None  # problem with a (non-None) value, or None if valid

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Parser that also accepts 'none'/'null' for None."""
    def parse_optional(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)
    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def count_or(word: str) -> Callable[[str], Any]:
    """Parser of a positive whole number, or of ``word`` itself (e.g. --eval-every epoch)."""
    def parse_count_or_word(text: str) -> int | str:
        if text.strip().lower() == word:
            return word
        # ArgumentTypeError: argparse shows its message (a ValueError's it replaces with its own)
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive whole number or '{word}', got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive whole number or '{word}', got {value}")
        return value
    parse_count_or_word.__name__ = f"number or '{word}'"
    return parse_count_or_word


Check = Callable[[Any], "str | None"]  # the problem with a value, or None


def at_least(minimum: float, why: str = "") -> Check:
    """A value >= minimum (for a list: each element)."""
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}{why}"
    return check


def greater_than(minimum: float, why: str = "") -> Check:
    def check(value: Any) -> str | None:
        return None if value > minimum else f"must be greater than {minimum}{why}"
    return check


def between(low: float, high: float, why: str = "", above_low: bool = False) -> Check:
    """low <= value <= high (low < value with ``above_low``)."""
    def check(value: Any) -> str | None:
        if (low < value if above_low else low <= value) and value <= high:
            return None
        return f"must be in {'(' if above_low else '['}{low}, {high}]{why}"
    return check


def multiple_of(step: int, why: str = "") -> Check:
    """A positive multiple of ``step``."""
    def check(value: Any) -> str | None:
        return None if value >= step and value % step == 0 else f"must be a positive multiple of {step}{why}"
    return check


def odd_positive(why: str = "") -> Check:
    def check(value: Any) -> str | None:
        return None if value >= 1 and value % 2 == 1 else f"must be an odd number >= 1{why}"
    return check


def if_number(check: Check) -> Check:
    """``check`` for numbers only (an option such as eval_every that also takes a word)."""
    return lambda value: check(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)


def problem_of(option: Option, value: Any) -> str | None:
    """What is wrong with ``value`` by the option's check, or None."""
    if option.check is None or value is None:
        return None
    for item in (value if option.repeatable else [value]):
        found = option.check(item)
        if found:
            return found
    return None


def checked(parse: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """An argparse type: ``parse`` then ``check`` (for scripts with plain argparse flags)."""
    def parse_checked(text: str) -> Any:
        value = parse(text)
        found = check(value)
        if found:
            raise argparse.ArgumentTypeError(f"{value!r} {found}")
        return value
    parse_checked.__name__ = getattr(parse, "__name__", "value")
    return parse_checked


def _parser_of(option: Option) -> Callable[[str], Any]:
    if option.type is not None:
        return option.type
    if isinstance(option.default, bool):
        raise AssertionError("bool options use --x/--no-x")
    if isinstance(option.default, (int, float)):
        return type(option.default)
    return str


def build_parser(options: Sequence[Option], description: str, epilog: str | None = None,
                 with_config: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    if with_config:
        parser.add_argument("--config", type=Path, default=None,
                            help="YAML file of option values (keys are the flag names with _). "
                                 "Flags given on the command line override it.")
    for option in options:
        default_text = "none" if option.default is None else option.default
        if option.repeatable:  # lists as users type them: --vae-channels 16 32 32
            default_text = " ".join(map(str, option.default)) or "none"
            help_text = f"{option.help}; a list: {option.flag} A B ... (default: {default_text})"
        else:
            help_text = f"{option.help} (default: {default_text})"
        if isinstance(option.default, bool) and option.type is None:
            parser.add_argument(option.flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.name, type=_parser_of(option),
                                choices=option.choices, default=argparse.SUPPRESS,
                                action="extend" if option.repeatable else "store",
                                nargs="+" if option.repeatable else None,
                                metavar=option.name.upper(), help=help_text)
    return parser


def _coerce(option: Option, value: Any, source: str) -> Any:
    """Check a YAML value against the option's type; convert ints to floats where floats are due."""
    if option.repeatable:
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        return [_coerce(Option(option.name, "", option.help, option.type), v, source) for v in values]
    if value is None:
        return None
    if isinstance(option.default, bool) and option.type is None:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {option.name} must be true or false, got {value!r}")
        return value
    parse = _parser_of(option)
    try:
        if isinstance(value, bool):
            raise ValueError("a boolean where a value is due")
        if parse is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        value = parse(value) if parse in (int, float) and isinstance(value, (int, float)) else parse(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{source}: {option.name} = {value!r} is not valid: {error}") from None
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{source}: {option.name} = {value!r}; choose one of {list(option.choices)}")
    return value


def read_yaml(path: Path, options: Sequence[Option]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {o.name: o for o in options if o.in_file}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(sorted(known))}")
    return {k: _coerce(known[k], v, str(path)) for k, v in data.items()}


def parse_config(options: Sequence[Option], description: str, argv: Sequence[str] | None = None,
                 epilog: str | None = None) -> SimpleNamespace:
    """Resolve the configuration: defaults, then the --config file, then flags.

    Returns a namespace with one attribute per option plus ``config`` (the YAML path or None) and
    ``explicit`` (the set of names given as flags, e.g. to check them against a resumed run).
    """
    parser = build_parser(options, description, epilog)
    args = parser.parse_args(argv)
    values = {o.name: (list(o.default) if o.repeatable else o.default) for o in options}
    config_path = getattr(args, "config", None)
    from_file = read_yaml(config_path, options) if config_path is not None else {}
    values.update(from_file)
    explicit = set()
    for option in options:
        if hasattr(args, option.name):
            values[option.name] = getattr(args, option.name)
            explicit.add(option.name)
    for option in options:
        found = problem_of(option, values[option.name])
        if found:
            where = (option.flag if option.name in explicit else
                     f"{config_path}: {option.name} =" if option.name in from_file else f"default {option.name} =")
            raise ConfigError(f"{where} {values[option.name]!r} {found}")
    return SimpleNamespace(**values, config=config_path, explicit=explicit)


def file_values(cfg: SimpleNamespace, options: Sequence[Option]) -> dict[str, Any]:
    """The options that belong in a saved config file, as plain YAML-able values."""
    return {o.name: getattr(cfg, o.name) for o in options if o.in_file}


def save_yaml(values: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
