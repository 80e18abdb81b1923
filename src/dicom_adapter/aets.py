"""AET dictionary (SPEC §1.8): JSON array of {"name", "host", "port"[, "tls"]}; parse, look up."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dicom_adapter.dimse.scu import AssociationTarget
from dicom_adapter.errors import ConfigError


@dataclass(frozen=True)
class Peer:
    """A remote application entity we may open associations to."""

    name: str
    host: str
    port: int
    tls: bool = False  # associations to it use DICOM TLS (--outgoing_tls_* flags)


class AetDictionary:
    """Peers by AE title (exact match after trimming trailing spaces)."""

    def __init__(self, peers: list[Peer]) -> None:
        self._peers = {p.name: p for p in peers}
        self.tls_context: ssl.SSLContext | None = None  # for peers with "tls": true

    def target(self, peer: Peer, calling_aet: str) -> AssociationTarget:
        """Where and how to associate with `peer` (over DICOM TLS when its entry says so)."""
        if peer.tls and self.tls_context is None:
            raise RuntimeError(f"{peer.name} needs DICOM TLS but no client context was built")
        tls = self.tls_context if peer.tls else None
        return AssociationTarget(calling_aet, peer.name, peer.host, peer.port, tls=tls)

    def get(self, aet: str) -> Peer | None:
        """The peer registered for `aet`, or None."""
        return self._peers.get(aet.strip())

    def __len__(self) -> int:
        return len(self._peers)

    @property
    def any_tls(self) -> bool:
        """True when some peer is reached over DICOM TLS."""
        return any(peer.tls for peer in self._peers.values())

    @property
    def names(self) -> list[str]:
        """Registered AE titles, sorted."""
        return sorted(self._peers)


def parse_aet_dictionary(text: str, flag: str) -> AetDictionary:
    """Parse and validate the JSON text; errors name the flag and the entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(flag, f"invalid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, list):
        raise ConfigError(flag, 'expected a JSON array of {"name", "host", "port"} objects')
    peers: list[Peer] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ConfigError(flag, f"{where}: expected an object with name, host, port")
        if isinstance(entry.get("name"), str):
            where = f"entry {index} ({entry['name']!r})"
        for key in ("name", "host", "port"):
            if key not in entry:
                hint = ' (use "host", not "ip")' if key == "host" and "ip" in entry else ""
                raise ConfigError(flag, f'{where}: missing "{key}"{hint}')
        name, host, port = entry["name"], entry["host"], entry["port"]
        if not isinstance(name, str) or not name.strip() or len(name.strip()) > 16:
            raise ConfigError(flag, f'{where}: "name" must be an AE title of 1-16 characters')
        if not isinstance(host, str) or not host.strip():
            raise ConfigError(flag, f'{where}: "host" must be a non-empty string')
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(flag, f'{where}: "port" must be a number from 1 to 65535')
        tls = entry.get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError(flag, f'{where}: "tls" must be true or false')
        if name.strip() in seen:
            raise ConfigError(flag, f"{where}: duplicate AE title")
        seen.add(name.strip())
        peers.append(Peer(name=name.strip(), host=host.strip(), port=port, tls=tls))
    return AetDictionary(peers)


def load_aet_dictionary(inline: str, path: str, environ: Mapping[str, str]) -> AetDictionary:
    """Load from --aet_dictionary_inline, else --aet_dictionary, else ENV_AETS_JSON; else empty."""
    if inline:
        return parse_aet_dictionary(inline, "aet_dictionary_inline")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("aet_dictionary", f"cannot read {path}: {exc.strerror}") from None
        return parse_aet_dictionary(text, "aet_dictionary")
    env_text = environ.get("ENV_AETS_JSON", "")
    if env_text:
        return parse_aet_dictionary(env_text, "ENV_AETS_JSON")
    return AetDictionary([])
