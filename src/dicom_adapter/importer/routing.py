"""Destination routing (SPEC §1.9): the Java adapter's destination config, parsed and matched.

A JSON array of `{"filter": "Key=Value&...", "dicomweb_destination": URL}` or
`{"filter": ..., "name": AET, "host": H, "port": P}` (a DIMSE destination). `AETitle=X` matches
the calling AE title exactly; every other key is a DICOM keyword or an 8-hex-digit tag matched
with C-FIND semantics (`*`, `?` wildcards, `\\`-separated alternatives, case-sensitive; a
single `*` matches even an absent attribute). An empty filter matches everything. Only the
attributes before PixelData are read, once per instance (`dicom.attributes`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydicom.datadict import dictionary_has_tag, dictionary_VR

from dicom_adapter.config.common import check_http_url, valid_aet
from dicom_adapter.dicom.tags import PIXEL_DATA, parse_tag
from dicom_adapter.errors import ConfigError

ENV_DESTINATION_CONFIG_JSON = "ENV_DESTINATION_CONFIG_JSON"
AE_TITLE_KEY = "AETitle"
_UNSAFE = re.compile(r"[^0-9A-Za-z.-]+")


@dataclass(frozen=True)
class Destination:
    """Where an instance goes: a STOW-RS URL, or a DIMSE peer (C-STORE)."""

    stow_url: str = ""
    aet: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False  # a DIMSE peer reached over DICOM TLS (--outgoing_tls_* flags)

    @property
    def is_dimse(self) -> bool:
        """True for a DIMSE peer."""
        return bool(self.aet)

    @property
    def key(self) -> str:
        """What identifies it: the STOW URL, or AET@host:port."""
        return f"{self.aet}@{self.host}:{self.port}" if self.is_dimse else self.stow_url

    @property
    def id(self) -> str:
        """A stable directory name: readable part + hash of `key` (same config, same name)."""
        if self.is_dimse:
            readable = f"dimse-{self.aet}"
        else:
            parts = urlsplit(self.stow_url)
            readable = f"web-{parts.hostname or ''}-{parts.port or ''}"
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:10]
        return f"{_UNSAFE.sub('_', readable)[:40]}-{digest}"

    def describe(self) -> str:
        """For logs and `dicom-spool status`."""
        return f"DIMSE {self.key}" if self.is_dimse else f"STOW-RS {self.stow_url}"

    def to_json(self) -> dict[str, object]:
        """As recorded beside its spool queue."""
        if self.is_dimse:
            return {"name": self.aet, "host": self.host, "port": self.port, "tls": self.tls}
        return {"dicomweb_destination": self.stow_url}


def stow_url_for(dicomweb_destination: str) -> str:
    """The Java rule: `/studies` is appended unless the URL already ends in `studies`."""
    url = dicomweb_destination.strip().rstrip("/")
    return url if url.endswith("studies") else url + "/studies"


@dataclass(frozen=True)
class Condition:
    """One `key=value` pair of a filter (not AETitle): the tag and its alternatives."""

    tag: int
    patterns: tuple[str, ...]
    vr: str = ""  # the dictionary VR: DA and TM values also match ranges (`from-to`)

    def matches(self, values: Sequence[str] | None) -> bool:
        """C-FIND matching: any pattern against any value; an absent/empty value matches only
        a lone `*` (universal matching)."""
        if self.patterns == ("*",):
            return True
        if not values:
            return False
        return any(self._one(p, v) for p in self.patterns for v in values)

    def _one(self, pattern: str, value: str) -> bool:
        if self.vr in _RANGE_VRS and pattern.count("-") == 1:
            return range_match(self.vr, pattern, value)
        return wildcard_match(pattern, value)


_RANGE_VRS = frozenset({"DA", "TM"})


def _range_key(vr: str, text: str, *, ceil: bool) -> str:
    """A DA or TM value as a fixed-width string that sorts in time order; `ceil` fills the
    missing precision of an upper bound with its maximum (`13` -> 13:59:59.999999)."""
    text = text.strip().replace(":", "") if vr == "TM" else text.strip().replace(".", "")
    if vr == "DA":
        return text
    whole, _, fraction = text.partition(".")
    fill = "9" if ceil else "0"
    return whole.ljust(6, fill) + "." + fraction.ljust(6, fill)


def range_match(vr: str, pattern: str, value: str) -> bool:
    """C-FIND range matching of a DA or TM value: `from-to`, `from-` or `-to`, inclusive."""
    low, high = pattern.split("-")
    key = _range_key(vr, value, ceil=False)
    if low and key < _range_key(vr, low, ceil=False):
        return False
    return not high or key <= _range_key(vr, high, ceil=True)


def wildcard_match(pattern: str, value: str) -> bool:
    """`*` any run, `?` one character, everything else literal and case-sensitive."""
    if "*" not in pattern and "?" not in pattern:
        return pattern == value
    return _compile(pattern).fullmatch(value) is not None


_compiled: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    regex = _compiled.get(pattern)
    if regex is None:
        body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        regex = _compiled[pattern] = re.compile(body, re.DOTALL)
    return regex


@dataclass(frozen=True)
class Rule:
    """A filter and its destination."""

    filter: str
    calling_aet: str | None
    conditions: tuple[Condition, ...]
    destination: Destination

    def matches(self, attributes: Mapping[int, Sequence[str]], calling_aet: str) -> bool:
        """True when the calling AE title and every condition match."""
        if self.calling_aet is not None and self.calling_aet != calling_aet:
            return False
        return all(c.matches(attributes.get(c.tag)) for c in self.conditions)


def _java_split(text: str, sep: str) -> list[str]:
    """String.split as Java does it: trailing empty strings are dropped."""
    parts = text.split(sep)
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def parse_filter(text: str) -> tuple[str | None, tuple[Condition, ...]]:
    """`Key=Value&...` -> (AETitle or None, conditions); ValueError naming the bad pair."""
    calling_aet: str | None = None
    conditions: list[Condition] = []
    for pair in _java_split(text, "&") if text else []:
        parts = _java_split(pair, "=")
        if len(parts) != 2:
            raise ValueError(f"{pair!r} is not key=value")
        key, value = parts
        if key == AE_TITLE_KEY:
            calling_aet = value
            continue
        tag = parse_tag(key)
        if tag >= PIXEL_DATA:
            raise ValueError(f"{key!r}: filters read only the attributes before PixelData")
        vr = dictionary_VR(tag) if dictionary_has_tag(tag) else ""
        conditions.append(Condition(tag, tuple(value.split("\\")), vr))
    return calling_aet, tuple(conditions)


class RoutingTable:
    """The rules in order; `route` gives the destinations of one instance (empty: default)."""

    def __init__(self, rules: Sequence[Rule], *, send_to_all: bool) -> None:
        self.rules = tuple(rules)
        self.send_to_all = send_to_all
        self.tags = sorted({c.tag for rule in self.rules for c in rule.conditions})

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def destinations(self) -> list[Destination]:
        """Every configured destination once, in order of first appearance."""
        return list(dict.fromkeys(rule.destination for rule in self.rules))

    def route(self, attributes: Mapping[int, Sequence[str]], calling_aet: str) -> list[Destination]:
        """First match (single mode) or every match (send to all), each destination once."""
        found: list[Destination] = []
        for rule in self.rules:
            if rule.matches(attributes, calling_aet):
                if not self.send_to_all:
                    return [rule.destination]
                if rule.destination not in found:
                    found.append(rule.destination)
        return found


def _destination(entry: dict[str, object], where: str) -> Destination:
    has_web = "dicomweb_destination" in entry
    dimse_keys = [k for k in ("name", "host", "port") if k in entry]
    if has_web and dimse_keys:
        raise ValueError(f'{where}: give "dicomweb_destination" or name/host/port, not both')
    if has_web:
        url = entry["dicomweb_destination"]
        if not isinstance(url, str) or check_http_url("x", url.strip()):
            raise ValueError(f'{where}: "dicomweb_destination" must be an http(s) URL')
        return Destination(stow_url=stow_url_for(url))
    if not dimse_keys:
        raise ValueError(f'{where}: missing "dicomweb_destination" (or name/host/port)')
    for key in ("name", "host", "port"):
        if key not in entry:
            raise ValueError(f'{where}: missing "{key}" of a DIMSE destination')
    name, host, port = entry["name"], entry["host"], entry["port"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f'{where}: "name" must be an AE title of 1-16 characters')
    try:
        aet = valid_aet(name)
    except ValueError as exc:
        raise ValueError(f'{where}: "name": {exc}') from None
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f'{where}: "host" must be a non-empty string')
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f'{where}: "port" must be a number from 1 to 65535')
    tls = entry.get("tls", False)
    if not isinstance(tls, bool):
        raise ValueError(f'{where}: "tls" must be true or false')
    return Destination(aet=aet, host=host.strip(), port=port, tls=tls)


def parse_destination_config(text: str, flag: str, *, send_to_all: bool) -> RoutingTable:
    """Parse and validate the JSON text; a problem is a ConfigError naming flag and entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(flag, f"invalid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, list):
        raise ConfigError(flag, 'expected a JSON array of {"filter", "dicomweb_destination"}')
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ConfigError(flag, f"{where}: expected an object with filter and a destination")
        text_filter = entry.get("filter")
        if "filter" not in entry:
            raise ConfigError(flag, f'{where}: missing "filter"')
        if not isinstance(text_filter, str):
            raise ConfigError(flag, f'{where}: "filter" must be a string')
        where = f"entry {index} (filter {text_filter!r})"
        try:
            calling_aet, conditions = parse_filter(text_filter)
            destination = _destination(entry, where)
        except ValueError as exc:
            message = str(exc)
            raise ConfigError(
                flag, message if message.startswith(where) else f"{where}: {message}"
            ) from None
        if not send_to_all:
            if destination.is_dimse:
                raise ConfigError(
                    flag,
                    f"{where}: DIMSE destination {destination.key} needs "
                    "--send_to_all_matching_destinations (single mode sends STOW-RS only)",
                )
            if text_filter in seen:
                raise ConfigError(
                    flag,
                    f"{where}: duplicate filter (use --send_to_all_matching_destinations "
                    "to send to several destinations)",
                )
        seen.add(text_filter)
        rules.append(Rule(text_filter, calling_aet, conditions, destination))
    return RoutingTable(rules, send_to_all=send_to_all)


def load_destination_config(
    inline: str, path: str, environ: Mapping[str, str], *, send_to_all: bool
) -> RoutingTable:
    """Java's order: --destination_config_inline, else --destination_config_path, else
    ENV_DESTINATION_CONFIG_JSON; else no rules."""
    if inline:
        return parse_destination_config(
            inline, "destination_config_inline", send_to_all=send_to_all
        )
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                "destination_config_path", f"cannot read {path}: {exc.strerror}"
            ) from None
        return parse_destination_config(text, "destination_config_path", send_to_all=send_to_all)
    env_text = environ.get(ENV_DESTINATION_CONFIG_JSON, "")
    if env_text:
        return parse_destination_config(
            env_text, ENV_DESTINATION_CONFIG_JSON, send_to_all=send_to_all
        )
    return RoutingTable([], send_to_all=send_to_all)
