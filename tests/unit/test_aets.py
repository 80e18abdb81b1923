"""Unit tests for the AET dictionary (SPEC §1.8): parsing, validation, sources, look-up."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from dicom_adapter.aets import AetDictionary, Peer, load_aet_dictionary, parse_aet_dictionary
from dicom_adapter.errors import ConfigError

FLAG = "aet_dictionary_inline"


def dumps(entries: Any) -> str:
    return json.dumps(entries)


def parse_error(text: str, flag: str = FLAG) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_aet_dictionary(text, flag)
    return info.value


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def test_parse_valid_dictionary() -> None:
    aets = parse_aet_dictionary(
        dumps(
            [
                {"name": "PACS", "host": "pacs.example", "port": 104},
                {"name": "VIEWER", "host": "10.0.0.7", "port": 11112},
            ]
        ),
        FLAG,
    )
    assert len(aets) == 2
    assert aets.names == ["PACS", "VIEWER"]
    assert aets.get("PACS") == Peer(name="PACS", host="pacs.example", port=104)
    assert aets.get("VIEWER") == Peer(name="VIEWER", host="10.0.0.7", port=11112)


def test_parse_empty_array() -> None:
    aets = parse_aet_dictionary("[]", FLAG)
    assert len(aets) == 0
    assert aets.names == []
    assert aets.get("PACS") is None


def test_extra_keys_are_ignored() -> None:
    aets = parse_aet_dictionary(
        dumps([{"name": "PACS", "host": "h", "port": 104, "comment": "main archive"}]), FLAG
    )
    assert aets.get("PACS") == Peer("PACS", "h", 104)


def test_port_as_digit_string_accepted() -> None:
    aets = parse_aet_dictionary(dumps([{"name": "PACS", "host": "h", "port": "4242"}]), FLAG)
    peer = aets.get("PACS")
    assert peer is not None
    assert peer.port == 4242


def test_names_and_hosts_trimmed() -> None:
    aets = parse_aet_dictionary(dumps([{"name": "PACS  ", "host": " h.example ", "port": 1}]), FLAG)
    assert aets.names == ["PACS"]
    assert aets.get("PACS") == Peer("PACS", "h.example", 1)


def test_invalid_json() -> None:
    error = parse_error('[{"name": "PACS", "host": "h", "port": 104,}]')
    assert error.flag == FLAG
    assert str(error).startswith(f"--{FLAG}:")
    assert "invalid JSON" in str(error)


def test_empty_text_is_invalid_json() -> None:
    error = parse_error("")
    assert "invalid JSON" in str(error)


@pytest.mark.parametrize("text", ['{"name": "PACS", "host": "h", "port": 104}', '"PACS"', "42"])
def test_not_an_array(text: str) -> None:
    error = parse_error(text)
    assert error.flag == FLAG
    assert "array" in str(error)


def test_entry_not_an_object() -> None:
    error = parse_error(dumps([{"name": "A", "host": "h", "port": 1}, ["B", "h", 2]]))
    assert "entry 1" in str(error)


@pytest.mark.parametrize("missing", ["name", "host", "port"])
def test_missing_key_names_entry_and_key(missing: str) -> None:
    entry: dict[str, Any] = {"name": "VIEWER", "host": "h", "port": 104}
    del entry[missing]
    error = parse_error(dumps([{"name": "PACS", "host": "h", "port": 104}, entry]))
    message = str(error)
    assert error.flag == FLAG
    assert "entry 1" in message
    assert f'"{missing}"' in message
    if missing != "name":
        assert "VIEWER" in message


def test_ip_instead_of_host_gives_hint() -> None:
    error = parse_error(dumps([{"name": "PACS", "ip": "10.0.0.1", "port": 104}]))
    message = str(error)
    assert "PACS" in message
    assert 'missing "host"' in message
    assert 'use "host", not "ip"' in message


def test_missing_host_without_ip_has_no_hint() -> None:
    error = parse_error(dumps([{"name": "PACS", "port": 104}]))
    assert 'missing "host"' in str(error)
    assert '"ip"' not in str(error)


@pytest.mark.parametrize("port", [0, -1, 65536, "abc", "", 104.5, True, None, [104]])
def test_bad_port(port: object) -> None:
    error = parse_error(dumps([{"name": "PACS", "host": "h", "port": port}]))
    assert "PACS" in str(error)
    assert '"port"' in str(error)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_accepted(port: int) -> None:
    peer = parse_aet_dictionary(dumps([{"name": "P", "host": "h", "port": port}]), FLAG).get("P")
    assert peer is not None
    assert peer.port == port


@pytest.mark.parametrize("name", ["", "   ", "ABCDEFGHIJKLMNOPQ", 7])
def test_bad_name(name: object) -> None:
    error = parse_error(dumps([{"name": name, "host": "h", "port": 104}]))
    assert '"name"' in str(error)


@pytest.mark.parametrize("host", ["", "  ", 10])
def test_bad_host(host: object) -> None:
    error = parse_error(dumps([{"name": "PACS", "host": host, "port": 104}]))
    assert '"host"' in str(error)
    assert "PACS" in str(error)


def test_duplicate_aet() -> None:
    error = parse_error(
        dumps(
            [
                {"name": "PACS", "host": "a", "port": 104},
                {"name": "PACS ", "host": "b", "port": 105},
            ]
        )
    )
    assert "duplicate" in str(error)
    assert "entry 1" in str(error)
    assert "PACS" in str(error)


# --------------------------------------------------------------------------------------------
# look-up
# --------------------------------------------------------------------------------------------


def test_lookup_trims_padding_and_is_exact() -> None:
    aets = AetDictionary([Peer("PACS", "h", 104)])
    assert aets.get("PACS") == Peer("PACS", "h", 104)
    assert aets.get("PACS   ") == Peer("PACS", "h", 104)
    assert aets.get("pacs") is None
    assert aets.get("PAC") is None
    assert aets.get("OTHER") is None


# --------------------------------------------------------------------------------------------
# sources: --aet_dictionary_inline > --aet_dictionary (file) > ENV_AETS_JSON
# --------------------------------------------------------------------------------------------


def peer_json(name: str) -> str:
    return dumps([{"name": name, "host": "h", "port": 104}])


def test_inline_wins_over_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "aets.json"
    path.write_text(peer_json("FROMFILE"), encoding="utf-8")
    aets = load_aet_dictionary(peer_json("INLINE"), str(path), {"ENV_AETS_JSON": peer_json("ENV")})
    assert aets.names == ["INLINE"]


def test_inline_wins_even_if_file_is_missing(tmp_path: Path) -> None:
    aets = load_aet_dictionary(peer_json("INLINE"), str(tmp_path / "absent.json"), {})
    assert aets.names == ["INLINE"]


def test_file_wins_over_env(tmp_path: Path) -> None:
    path = tmp_path / "aets.json"
    path.write_text(peer_json("FROMFILE"), encoding="utf-8")
    aets = load_aet_dictionary("", str(path), {"ENV_AETS_JSON": peer_json("ENV")})
    assert aets.names == ["FROMFILE"]


def test_env_used_last() -> None:
    aets = load_aet_dictionary("", "", {"ENV_AETS_JSON": peer_json("ENV")})
    assert aets.names == ["ENV"]
    assert aets.get("ENV") == Peer("ENV", "h", 104)


def test_no_source_gives_empty_dictionary() -> None:
    aets = load_aet_dictionary("", "", {})
    assert len(aets) == 0


def test_missing_file_names_flag_and_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as info:
        load_aet_dictionary("", str(path), {})
    assert info.value.flag == "aet_dictionary"
    assert str(path) in str(info.value)


def test_errors_name_their_source(tmp_path: Path) -> None:
    path = tmp_path / "aets.json"
    path.write_text("not json", encoding="utf-8")
    with pytest.raises(ConfigError) as from_file:
        load_aet_dictionary("", str(path), {})
    assert from_file.value.flag == "aet_dictionary"
    assert str(from_file.value).startswith("--aet_dictionary:")

    with pytest.raises(ConfigError) as from_inline:
        load_aet_dictionary("{}", "", {})
    assert from_inline.value.flag == "aet_dictionary_inline"

    with pytest.raises(ConfigError) as from_env:
        load_aet_dictionary("", "", {"ENV_AETS_JSON": '[{"name": "X", "ip": "h", "port": 1}]'})
    assert from_env.value.flag == "ENV_AETS_JSON"
    assert str(from_env.value).startswith("ENV_AETS_JSON:")
    assert 'not "ip"' in str(from_env.value)


def test_tls_entries_get_the_client_context_and_others_do_not() -> None:
    aets = parse_aet_dictionary(
        '[{"name": "SECURE", "host": "h", "port": 2762, "tls": true},'
        ' {"name": "PLAIN", "host": "h", "port": 104}]',
        "aet_dictionary_inline",
    )
    assert aets.any_tls
    secure, plain = aets.get("SECURE"), aets.get("PLAIN")
    assert secure is not None and plain is not None
    with pytest.raises(RuntimeError):  # a TLS peer is never reached in the clear
        aets.target(secure, "ADAPTER")
    aets.tls_context = ssl.create_default_context()
    assert aets.target(secure, "ADAPTER").tls is aets.tls_context
    assert aets.target(plain, "ADAPTER").tls is None


def test_tls_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match='"tls" must be true or false'):
        parse_aet_dictionary('[{"name": "X", "host": "h", "port": 1, "tls": "yes"}]', "f")
