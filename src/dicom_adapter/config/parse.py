"""Command line + environment → frozen settings, with the Java adapter's flag syntax.

Accepts `--flag=value`, `--flag value` and bare `--bool` (also `--bool=false`). Every problem
becomes a ConfigError naming the flag; the CLI turns it into one stderr line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from dicom_adapter.config.common import CommonSettings
from dicom_adapter.errors import ConfigError

S = TypeVar("S", bound=CommonSettings)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("", message)


def flag_status(info: FieldInfo) -> str:
    """'' for a plain Java flag, else 'new', 'deprecated' or 'not supported yet'."""
    extra = info.json_schema_extra
    if isinstance(extra, dict):
        return str(extra.get("status", ""))
    return ""


def _is_bool(info: FieldInfo) -> bool:
    return info.annotation is bool


def _is_collection(info: FieldInfo) -> bool:
    return typing.get_origin(info.annotation) in (frozenset, list, tuple, set) or any(
        typing.get_origin(a) in (frozenset, list) for a in typing.get_args(info.annotation)
    )


def default_text(info: FieldInfo) -> str:
    default = info.default
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, frozenset):
        return ",".join(str(x) for x in sorted(default)) or "(none)"
    if default == "":
        return "(empty)"
    return str(default)


def build_parser(
    model: type[CommonSettings], prog: str, description: str
) -> argparse.ArgumentParser:
    """An argparse parser with one option per settings field."""
    parser = _Parser(
        prog=prog,
        usage="%(prog)s [--flag=value ...]  (see the flags below)",
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, info in model.model_fields.items():
        status = flag_status(info)
        note = f" [{status}]" if status else ""
        help_text = (
            f"{info.description or ''}{note} (default: {default_text(info)}; env: {name.upper()})"
        ).replace("%", "%%")
        if _is_bool(info):
            parser.add_argument(
                f"--{name}", nargs="?", const="true", default=None, metavar="BOOL", help=help_text
            )
        elif _is_collection(info):
            parser.add_argument(
                f"--{name}", action="append", default=None, metavar="LIST", help=help_text
            )
        else:
            parser.add_argument(f"--{name}", default=None, metavar="VALUE", help=help_text)
    return parser


def parse_settings(
    model: type[S],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Parse flags (over env vars, over defaults) into a validated, frozen settings object."""
    parser = build_parser(model, prog, description)
    namespace = parser.parse_args(list(argv))
    given: dict[str, Any] = {}
    for name, value in vars(namespace).items():
        if value is None:
            continue
        given[name] = ",".join(value) if isinstance(value, list) else value
    env = os.environ if environ is None else environ
    env_values = {
        name: env[name.upper()]
        for name in model.model_fields
        if name not in given and name.upper() in env
    }
    try:
        settings = model.model_validate({**env_values, **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = str(first["loc"][0]) if first["loc"] else ""
        source = "" if flag in given else f" (from env {flag.upper()})"
        raise ConfigError(flag, f"{first['msg']}{source}") from None
    for name in sorted(settings.model_fields_set):
        if flag_status(model.model_fields[name]) == "not supported yet":
            raise ConfigError(name, "not supported yet in this release")
    problems = settings.cross_check()
    if problems:
        raise ConfigError(*problems[0])
    return settings


def deprecation_notes(settings: CommonSettings) -> list[str]:
    """One line per deprecated flag that was set, for the log once logging is configured."""
    return [
        f"--{name} is deprecated; use --{settings.deprecation_replacement}"
        for name in sorted(settings.model_fields_set)
        if flag_status(type(settings).model_fields[name]) == "deprecated"
    ]
