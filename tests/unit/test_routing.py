"""Destination routing (issue 10 point 1): config parsing, filter matching, attribute reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_adapter.dicom.attributes import read_filter_attributes
from dicom_adapter.errors import ConfigError, InvalidDatasetError
from dicom_adapter.importer.routing import (
    Condition,
    Destination,
    RoutingTable,
    load_destination_config,
    parse_destination_config,
    parse_filter,
    stow_url_for,
    wildcard_match,
)

MODALITY = 0x00080060
PATIENT_NAME = 0x00100010
STUDY_DESCRIPTION = 0x00081030
WEB_A = "http://a.example/dicom-web"
WEB_B = "http://b.example:8042/dicom-web"


def table(rules: list[dict[str, object]], *, send_to_all: bool = False) -> RoutingTable:
    return parse_destination_config(json.dumps(rules), "flag", send_to_all=send_to_all)


def config_error(rules: object, *, send_to_all: bool = False, raw: str | None = None) -> str:
    text = raw if raw is not None else json.dumps(rules)
    with pytest.raises(ConfigError) as info:
        parse_destination_config(text, "destination_config_inline", send_to_all=send_to_all)
    message = str(info.value)
    assert message.startswith("--destination_config_inline: ")
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# wildcard matching (C-FIND semantics, case-sensitive)


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("CT", "CT", True),
        ("CT", "ct", False),  # case-sensitive
        ("CT", "CTX", False),
        ("C*", "CT", True),
        ("C*", "C", True),
        ("*T", "CT", True),
        ("C?", "CT", True),
        ("C?", "C", False),
        ("C?", "CTT", False),
        ("*", "", True),
        ("?", "", False),
        ("Smith^*", "Smith^John", True),
        ("smith^*", "Smith^John", False),
        ("a.b", "axb", False),  # regex characters are literal
        ("1.2.*", "1.2.840", True),
        ("[x]", "[x]", True),
        ("*^J?hn", "Smith^John", True),
    ],
)
def test_wildcard_match(pattern: str, value: str, expected: bool) -> None:
    assert wildcard_match(pattern, value) is expected


def test_condition_absent_or_empty_value_matches_only_universal() -> None:
    assert not Condition(MODALITY, ("CT",)).matches(None)
    assert not Condition(MODALITY, ("CT",)).matches([])
    assert not Condition(MODALITY, ("C*",)).matches([])
    assert Condition(MODALITY, ("*",)).matches(None)


def test_condition_multi_values_and_alternatives() -> None:
    assert Condition(MODALITY, ("MG",)).matches(["CT", "MG"])  # any value of the attribute
    assert Condition(MODALITY, ("CT", "MG")).matches(["MG"])  # backslash alternatives
    assert not Condition(MODALITY, ("CT", "MR")).matches(["MG"])


# --------------------------------------------------------------------------------------------
# filters


def test_empty_filter_matches_everything() -> None:
    routes = table([{"filter": "", "dicomweb_destination": WEB_A}])
    assert routes.route({}, "ANY") == [Destination(stow_url=WEB_A + "/studies")]


def test_filter_keyword_and_hex_tag() -> None:
    aet, conditions = parse_filter("Modality=MG&00081030=Screening*")
    assert aet is None
    assert conditions == (
        Condition(MODALITY, ("MG",), "CS"),
        Condition(STUDY_DESCRIPTION, ("Screening*",), "LO"),
    )
    # hex digits in lower case are tags too; a private tag has no dictionary VR
    assert parse_filter("0008103e=x")[1] == (Condition(0x0008103E, ("x",), "LO"),)
    assert parse_filter("00091001=x")[1] == (Condition(0x00091001, ("x",), ""),)


@pytest.mark.parametrize(
    ("vr", "pattern", "value", "expected"),
    [
        ("DA", "20240101-20241231", "20240615", True),
        ("DA", "20240101-20241231", "20240101", True),
        ("DA", "20240101-20241231", "20241231", True),
        ("DA", "20240101-20241231", "20250101", False),
        ("DA", "20240101-", "20991231", True),
        ("DA", "20240101-", "20231231", False),
        ("DA", "-20240101", "19700101", True),
        ("DA", "-20240101", "20240102", False),
        ("TM", "1000-1300", "1259", True),
        ("TM", "1000-1300", "130059.5", True),  # the upper bound covers its whole minute
        ("TM", "1000-1300", "1301", False),
        ("TM", "1000-1300", "095959", False),
        ("TM", "10:00-13", "13:45", True),
    ],
)
def test_date_and_time_ranges(vr: str, pattern: str, value: str, expected: bool) -> None:
    tag = {"DA": 0x00080020, "TM": 0x00080030}[vr]  # StudyDate, StudyTime
    [condition] = parse_filter(f"{'StudyDate' if vr == 'DA' else 'StudyTime'}={pattern}")[1]
    assert condition == Condition(tag, (pattern,), vr)
    assert condition.matches([value]) is expected


def test_a_hyphen_is_literal_outside_dates_and_times() -> None:
    [condition] = parse_filter("StudyDescription=A-B")[1]
    assert condition.matches(["A-B"])
    assert not condition.matches(["AB"])


def test_ae_title_matches_calling_aet_exactly() -> None:
    routes = table([{"filter": "AETitle=MODALITY1", "dicomweb_destination": WEB_A}])
    assert routes.route({}, "MODALITY1") == [Destination(stow_url=WEB_A + "/studies")]
    assert routes.route({}, "MODALITY2") == []
    assert routes.route({}, "modality1") == []
    # no wildcards for the AE title: it is compared as it is
    star = table([{"filter": "AETitle=MOD*", "dicomweb_destination": WEB_A}])
    assert star.route({}, "MODALITY1") == []


def test_ae_title_and_attributes_all_must_match() -> None:
    routes = table([{"filter": "AETitle=US1&Modality=US", "dicomweb_destination": WEB_A}])
    assert routes.route({MODALITY: ["US"]}, "US1")
    assert not routes.route({MODALITY: ["CT"]}, "US1")
    assert not routes.route({MODALITY: ["US"]}, "US2")


def test_single_mode_first_match_wins_and_no_match_is_default() -> None:
    routes = table(
        [
            {"filter": "Modality=MG", "dicomweb_destination": WEB_A},
            {"filter": "Modality=M*", "dicomweb_destination": WEB_B},
        ]
    )
    assert routes.route({MODALITY: ["MG"]}, "X") == [Destination(stow_url=WEB_A + "/studies")]
    assert routes.route({MODALITY: ["MR"]}, "X") == [Destination(stow_url=WEB_B + "/studies")]
    assert routes.route({MODALITY: ["CT"]}, "X") == []


def test_send_to_all_every_match_each_destination_once() -> None:
    routes = table(
        [
            {"filter": "Modality=MG", "dicomweb_destination": WEB_A},
            {"filter": "Modality=MG", "name": "PACS", "host": "pacs.example", "port": 104},
            {"filter": "", "dicomweb_destination": WEB_A},
        ],
        send_to_all=True,
    )
    web = Destination(stow_url=WEB_A + "/studies")
    pacs = Destination(aet="PACS", host="pacs.example", port=104)
    assert routes.route({MODALITY: ["MG"]}, "X") == [web, pacs]
    assert routes.route({MODALITY: ["CT"]}, "X") == [web]
    assert routes.destinations == [web, pacs]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h/dicom-web", "http://h/dicom-web/studies"),
        ("http://h/dicom-web/", "http://h/dicom-web/studies"),
        ("http://h/dicom-web/studies", "http://h/dicom-web/studies"),
        ("http://h/dicomWeb/studies/", "http://h/dicomWeb/studies"),
    ],
)
def test_studies_appended_unless_present(url: str, expected: str) -> None:
    assert stow_url_for(url) == expected


# --------------------------------------------------------------------------------------------
# every error stops startup with one line naming the entry


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([{"filter": "Modality", "dicomweb_destination": WEB_A}], "entry 0 (filter 'Modality')"),
        ([{"filter": "Modality=", "dicomweb_destination": WEB_A}], "'Modality=' is not key=value"),
        ([{"filter": "Modality=CT=MG", "dicomweb_destination": WEB_A}], "is not key=value"),
        ([{"filter": "=CT", "dicomweb_destination": WEB_A}], "unknown DICOM keyword ''"),
        ([{"filter": "Modalty=CT", "dicomweb_destination": WEB_A}], "unknown DICOM keyword"),
        ([{"filter": "0008006=CT", "dicomweb_destination": WEB_A}], "unknown DICOM keyword"),
        ([{"filter": "PixelData=x", "dicomweb_destination": WEB_A}], "before PixelData"),
        ([{"filter": "&Modality=CT", "dicomweb_destination": WEB_A}], "'' is not key=value"),
        ([{"dicomweb_destination": WEB_A}], 'entry 0: missing "filter"'),
        ([{"filter": 3, "dicomweb_destination": WEB_A}], '"filter" must be a string'),
        ([{"filter": ""}], 'missing "dicomweb_destination"'),
        ([{"filter": "", "dicomweb_destination": "ftp://x"}], "must be an http(s) URL"),
        (
            [{"filter": "", "dicomweb_destination": WEB_A, "name": "P", "host": "h", "port": 1}],
            "not both",
        ),
        ([7], "entry 0: expected an object"),
        ({"filter": ""}, "expected a JSON array"),
    ],
)
def test_config_errors(rules: object, expected: str) -> None:
    assert expected in config_error(rules)


def test_second_entry_is_named() -> None:
    message = config_error(
        [
            {"filter": "Modality=CT", "dicomweb_destination": WEB_A},
            {"filter": "Modality=MG&Bogus=1", "dicomweb_destination": WEB_B},
        ]
    )
    assert "entry 1 (filter 'Modality=MG&Bogus=1')" in message
    assert "'Bogus'" in message


def test_invalid_json() -> None:
    assert "invalid JSON" in config_error(None, raw="[{")


def test_duplicate_filter_refused_in_single_mode_only() -> None:
    rules: list[dict[str, object]] = [
        {"filter": "Modality=MG", "dicomweb_destination": WEB_A},
        {"filter": "Modality=MG", "dicomweb_destination": WEB_B},
    ]
    message = config_error(rules)
    assert "entry 1 (filter 'Modality=MG'): duplicate filter" in message
    assert "--send_to_all_matching_destinations" in message
    assert len(table(rules, send_to_all=True)) == 2


def test_dimse_destination_refused_in_single_mode() -> None:
    rules = [{"filter": "Modality=CT", "name": "PACS", "host": "pacs", "port": 104}]
    message = config_error(rules)
    assert "entry 0 (filter 'Modality=CT')" in message
    assert "PACS@pacs:104" in message
    assert "--send_to_all_matching_destinations" in message
    assert table(rules, send_to_all=True).destinations == [
        Destination(aet="PACS", host="pacs", port=104)
    ]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "PACS", "host": "pacs"}, 'missing "port"'),
        ({"name": "PACS", "port": 104}, 'missing "host"'),
        ({"host": "pacs", "port": 104}, 'missing "name"'),
        ({"name": "ABCDEFGHIJKLMNOPQ", "host": "pacs", "port": 104}, "16 characters"),
        ({"name": "", "host": "pacs", "port": 104}, '"name" must be an AE title'),
        ({"name": "PACS", "host": " ", "port": 104}, '"host" must be'),
        ({"name": "PACS", "host": "pacs", "port": 0}, '"port" must be'),
        ({"name": "PACS", "host": "pacs", "port": "x"}, '"port" must be'),
        ({"name": "PACS", "host": "pacs", "port": True}, '"port" must be'),
    ],
)
def test_dimse_destination_errors(entry: dict[str, object], expected: str) -> None:
    message = config_error([{"filter": "", **entry}], send_to_all=True)
    assert "entry 0 (filter '')" in message
    assert expected in message


# --------------------------------------------------------------------------------------------
# where the config comes from: inline, else path, else ENV_DESTINATION_CONFIG_JSON


def _rules(url: str) -> str:
    return json.dumps([{"filter": "Modality=MG", "dicomweb_destination": url}])


def test_load_order(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(_rules(WEB_B))
    env = {"ENV_DESTINATION_CONFIG_JSON": _rules("http://env.example/dw")}

    def first(inline: str, file: str, environ: dict[str, str]) -> str:
        routes = load_destination_config(inline, file, environ, send_to_all=False)
        return routes.destinations[0].stow_url if len(routes) else ""

    assert first(_rules(WEB_A), str(path), env) == WEB_A + "/studies"
    assert first("", str(path), env) == WEB_B + "/studies"
    assert first("", "", env) == "http://env.example/dw/studies"
    assert first("", "", {}) == ""


def test_unreadable_path_and_env_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_destination_config("", str(tmp_path / "nope.json"), {}, send_to_all=False)
    assert str(info.value).startswith("--destination_config_path: cannot read")
    with pytest.raises(ConfigError) as info:
        load_destination_config("", "", {"ENV_DESTINATION_CONFIG_JSON": "[{"}, send_to_all=False)
    assert str(info.value).startswith("ENV_DESTINATION_CONFIG_JSON: invalid JSON")


# --------------------------------------------------------------------------------------------
# destinations


def test_destination_ids_are_stable_and_distinct() -> None:
    web = Destination(stow_url="http://b.example:8042/dicom-web/studies")
    other = Destination(stow_url="http://b.example:8042/other/studies")
    pacs = Destination(aet="PACS", host="pacs", port=104)
    assert web.id == Destination(stow_url=web.stow_url).id
    assert web.id.startswith("web-b.example-8042-")
    assert pacs.id.startswith("dimse-PACS-")
    assert len({web.id, other.id, pacs.id}) == 3


# --------------------------------------------------------------------------------------------
# reading the filters' attributes from a received file


def _write(path: Path, **attributes: object) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_read_filter_attributes(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.dcm",
        Modality="MG",
        PatientName="Smith^John",
        ImageType=["ORIGINAL", "PRIMARY"],
        Rows=16,
        StudyDescription="",
        BitsAllocated=8,
        PixelData=b"\0" * 16,
    )
    image_type, rows = 0x00080008, 0x00280010
    found = read_filter_attributes(
        path, sorted([MODALITY, PATIENT_NAME, image_type, rows, STUDY_DESCRIPTION, 0x00100020])
    )
    assert found[MODALITY] == ["MG"]
    assert found[PATIENT_NAME] == ["Smith^John"]
    assert found[image_type] == ["ORIGINAL", "PRIMARY"]
    assert found[rows] == ["16"]
    assert found[STUDY_DESCRIPTION] == []
    assert 0x00100020 not in found  # absent


def test_read_filter_attributes_stops_at_the_last_filter_tag(tmp_path: Path) -> None:
    """Whatever follows the last tag a filter names is never parsed (nor read, mostly)."""
    path = _write(tmp_path / "b.dcm", Modality="CT", PatientName="X")
    data = path.read_bytes()
    # garbage right after (0008,0060): a full parse fails, reading up to Modality does not
    pos = data.index(b"\x08\x00\x60\x00CS") + 8 + 2
    path.write_bytes(data[:pos] + b"\x10\x00\x10\x00PN\xff\xff")
    assert read_filter_attributes(path, [MODALITY]) == {MODALITY: ["CT"]}


def test_read_filter_attributes_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all")
    with pytest.raises(InvalidDatasetError):
        read_filter_attributes(path, [MODALITY])


# --------------------------------------------------------------------------------------------
# the console script: one stderr line, exit 2


def run_import(
    *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "100", **(extra_env or {})}
    if "PYTHONPATH" in os.environ:  # a worktree's sources over the installed package
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [str(Path(sys.executable).with_name("dicom-import")), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


ENV = "ENV_DESTINATION_CONFIG_JSON"
BASE = ["--dimse_aet=ADAPTER", "--dicomweb_address=http://127.0.0.1:9/dicom-web"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--send_to_all_matching_destinations"],
            "--send_to_all_matching_destinations: needs --persistent_file_storage_location",
        ),
        (
            [
                "--destination_config_inline="
                + json.dumps([{"filter": "Modality=CT", "name": "PACS", "host": "h", "port": 1}])
            ],
            "--destination_config_inline: entry 0 (filter 'Modality=CT'): DIMSE destination",
        ),
        (
            [
                "--destination_config_inline="
                + json.dumps([{"filter": "Modalty=CT", "dicomweb_destination": WEB_A}])
            ],
            "--destination_config_inline: entry 0 (filter 'Modalty=CT'): unknown DICOM keyword",
        ),
    ],
)
def test_script_refuses_bad_routing_with_one_line(args: list[str], expected: str) -> None:
    result = run_import(*BASE, "--dimse_port=0", "--metrics_port=-1", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dicom-import: {expected}")


def test_script_reads_env_destination_config_json() -> None:
    rules = json.dumps([{"filter": "Modality=CT", "name": "PACS", "host": "h", "port": 1}])
    result = run_import(*BASE, "--dimse_port=0", "--metrics_port=-1", extra_env={ENV: rules})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"dicom-import: {ENV}: entry 0 (filter 'Modality=CT'): DIMSE")
