"""Pure C-FIND <-> QIDO-RS mapping: identifier -> queries, DICOM JSON -> Dataset, answer shaping."""

from __future__ import annotations

import base64
import copy
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DSfloat

from dicom_adapter.errors import InvalidDatasetError
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
MODALITIES_IN_STUDY = 0x00080061
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
NUMBER_OF_PATIENT_RELATED_STUDIES = 0x00201200
NUMBER_OF_PATIENT_RELATED_SERIES = 0x00201202
NUMBER_OF_PATIENT_RELATED_INSTANCES = 0x00201204
NUMBER_OF_STUDY_RELATED_SERIES = 0x00201206
NUMBER_OF_STUDY_RELATED_INSTANCES = 0x00201208
NUMBER_OF_SERIES_RELATED_INSTANCES = 0x00201209
_PATIENT_COUNT_TAGS = frozenset(
    {
        NUMBER_OF_PATIENT_RELATED_STUDIES,
        NUMBER_OF_PATIENT_RELATED_SERIES,
        NUMBER_OF_PATIENT_RELATED_INSTANCES,
    }
)
_STUDY_COUNT_TAGS = (NUMBER_OF_STUDY_RELATED_SERIES, NUMBER_OF_STUDY_RELATED_INSTANCES)

_NEVER_SENT = frozenset({QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC"})
_TEXT_VRS_ALL = _TEXT_VRS | {"UI", "UR", "UT", "IS", "DS"}
_KNOWN_VRS = _BINARY_VRS | _INT_VRS | _FLOAT_VRS | _TEXT_VRS_ALL | {"AT", "SQ"}
# Written in the default repertoire whatever SpecificCharacterSet says (PS3.5 6.1.2.3)
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
# What each binary number VR can hold; a value outside cannot be encoded.
_INT_RANGES = {
    "US": (0, 2**16 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "UV": (0, 2**64 - 1),
    "SV": (-(2**63), 2**63 - 1),
}
_FL_MAX = 3.4028234663852886e38
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# A UID we are willing to put in a URL path: digits and dots only, at most 64 characters.
_PATH_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_JSON_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_UTF8_CHARSET = "ISO_IR 192"


class QueryLevel(StrEnum):
    """C-FIND QueryRetrieveLevel values."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryRoot(StrEnum):
    """C-FIND information model root."""

    STUDY = "STUDY"
    PATIENT = "PATIENT"


class IdentifierError(InvalidDatasetError):
    """A C-FIND identifier we cannot translate into QIDO-RS (answered with Cannot Understand)."""

    status = Status.CANNOT_UNDERSTAND


@dataclass(frozen=True)
class QidoQuery:
    """One QIDO-RS request: path relative to the DICOMweb root, query params, requested tags."""

    level: QueryLevel
    path: str
    params: tuple[tuple[str, str], ...]
    requested: tuple[int, ...]


# --------------------------------------------------------------------------- identifier -> QIDO


def _param_name(tag: int) -> str:
    """Keyword for a standard tag; 8-hex (upper case) for private, repeater or unknown tags."""
    keyword = keyword_for_tag(tag)
    if keyword and tag_for_keyword(keyword) == tag:
        return keyword
    return f"{tag:08X}"


def _value_text(value: Any, vr: str) -> str:
    """One identifier value as QIDO text, trailing padding removed."""
    if vr == "AT":
        return f"{int(value):08X}"
    if isinstance(value, bytes | bytearray):
        raise IdentifierError("binary values cannot be used as QIDO matching keys")
    return str(value).rstrip(" \x00")


def _values(elem: DataElement) -> list[str]:
    """The element's non-empty values as strings (empty list: a return key)."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        if not value:
            return []
        raise IdentifierError(f"cannot match on binary key {_param_name(elem.tag)}")
    items: list[Any] = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [_value_text(item, elem.VR) for item in items if item is not None]
    return [text for text in texts if text]


def _is_unique_uid(values: list[str]) -> bool:
    """True for exactly one UID value that is safe and meaningful in a URL path."""
    return len(values) == 1 and len(values[0]) <= 64 and _PATH_UID.fullmatch(values[0]) is not None


def _level_of(identifier: Dataset, root: QueryRoot) -> QueryLevel:
    """QueryRetrieveLevel of the identifier, validated against the information model root."""
    elem = identifier.get(QUERY_RETRIEVE_LEVEL)
    raw = "" if elem is None or elem.value is None else str(elem.value).strip().upper()
    try:
        level = QueryLevel(raw)
    except ValueError:
        raise IdentifierError(f"unknown QueryRetrieveLevel {raw!r}") from None
    if level is QueryLevel.PATIENT and root is not QueryRoot.PATIENT:
        raise IdentifierError("PATIENT level is only valid with the Patient Root model")
    return level


def _elements(identifier: Dataset) -> list[DataElement]:
    """Top-level elements, decoded; a value pydicom cannot decode makes the identifier invalid."""
    try:
        return list(identifier)
    except Exception as exc:
        raise IdentifierError(
            f"identifier cannot be decoded: {exc}", comment="identifier cannot be decoded"
        ) from exc


def build_queries(identifier: Dataset, root: QueryRoot, *, fuzzy: bool = False) -> list[QidoQuery]:
    """Translate a C-FIND identifier into the QIDO-RS queries whose union answers it.

    Several queries only when ModalitiesInStudy has several values (QIDO cannot OR them);
    the caller merges and de-duplicates the answers.
    """
    level = _level_of(identifier, root)
    elements = _elements(identifier)
    requested = tuple(int(elem.tag) for elem in elements)

    matches: list[tuple[str, str]] = []
    includes: list[tuple[str, str]] = []
    unique: dict[int, str] = {}
    modalities: list[str] = []
    modality_index: int | None = None

    for elem in elements:
        tag = int(elem.tag)
        if tag in _NEVER_SENT:
            continue
        name = _param_name(tag)
        if level is QueryLevel.PATIENT and tag in _PATIENT_COUNT_TAGS:
            # no patient resource to give them: counted from the studies' own counts instead
            includes += [("includefield", f"{study:08X}") for study in _STUDY_COUNT_TAGS]
            continue
        values = [] if elem.VR == "SQ" else _values(elem)
        if not values or values == ["*"]:  # a lone "*" is universal matching (PS3.4 C.2.2.2.4)
            includes.append(("includefield", f"{tag:08X}"))
            continue
        if tag in (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID) and _is_unique_uid(values):
            unique[tag] = values[0]
        if len(values) == 1:
            matches.append((name, values[0]))
        elif elem.VR == "UI":
            matches.append((name, ",".join(values)))
        elif tag == MODALITIES_IN_STUDY:
            modalities = list(dict.fromkeys(values))
            modality_index = len(matches)
            matches.append((name, modalities[0]))
        else:
            raise IdentifierError(f"{name}: multiple values can only be matched for UIDs")

    includes = list(dict.fromkeys(includes))
    path, in_path = _path(level, unique)
    matches = [m for m in matches if m[0] not in in_path]
    if modality_index is not None:
        modality_index = next(i for i, m in enumerate(matches) if m[0] == "ModalitiesInStudy")
    tail = [*includes, *([("fuzzymatching", "true")] if fuzzy else [])]

    if modality_index is None:
        return [QidoQuery(level, path, tuple(matches + tail), requested)]
    queries = []
    for modality in modalities:
        params = list(matches)
        params[modality_index] = ("ModalitiesInStudy", modality)
        queries.append(QidoQuery(level, path, tuple(params + tail), requested))
    return queries


def _path(level: QueryLevel, unique: Mapping[int, str]) -> tuple[str, frozenset[str]]:
    """Resource path for the level, using unique higher-level UIDs; also the keys it consumed."""
    study = unique.get(STUDY_INSTANCE_UID)
    series = unique.get(SERIES_INSTANCE_UID)
    if level in (QueryLevel.PATIENT, QueryLevel.STUDY):
        return "studies", frozenset()
    if level is QueryLevel.SERIES:
        if study is not None:
            return f"studies/{study}/series", frozenset({"StudyInstanceUID"})
        return "series", frozenset()
    if study is not None and series is not None:
        path = f"studies/{study}/series/{series}/instances"
        return path, frozenset({"StudyInstanceUID", "SeriesInstanceUID"})
    if study is not None:
        return f"studies/{study}/instances", frozenset({"StudyInstanceUID"})
    return "instances", frozenset()


# --------------------------------------------------------------------------- DICOM JSON -> Dataset


def _vr_for(tag: int, declared: Any) -> str:
    """The element's VR: as declared when valid, else from the dictionary, else UN."""
    if isinstance(declared, str) and declared in _KNOWN_VRS:
        return declared
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    vr = vr.split(" or ")[0]
    return vr if vr in _KNOWN_VRS else "UN"


def _pn_text(item: Any) -> str:
    """A DICOM JSON PN value (object of component groups) as "A=I=P", empty groups trimmed."""
    if item is None:
        return ""
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        raise TypeError("PN value is neither an object nor a string")
    groups = []
    for group in _PN_GROUPS:
        text = item.get(group, "")
        if not isinstance(text, str):
            raise TypeError("PN component group is not a string")
        groups.append(text)
    return "=".join(groups).rstrip("=")


def _at_tag(item: Any) -> BaseTag:
    """A DICOM JSON AT value ("GGGGEEEE") as a tag."""
    if isinstance(item, str) and _JSON_TAG.fullmatch(item):
        return Tag(int(item, 16))
    if isinstance(item, int) and not isinstance(item, bool):
        return Tag(item)
    raise ValueError("AT value is not an 8-digit hex string")


def _number(item: Any, vr: str) -> Any:
    """One numeric value, encodable in its VR; IS/DS may arrive as JSON numbers or strings."""
    value = _parse_number(item, vr)
    bounds = _INT_RANGES.get(vr)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{value} does not fit {vr}")
    if vr == "FL" and math.isfinite(value) and abs(value) > _FL_MAX:
        raise ValueError(f"{value} does not fit FL")
    return value


def _parse_number(item: Any, vr: str) -> Any:
    if isinstance(item, bool):
        raise TypeError("boolean is not a DICOM number")
    if isinstance(item, str) and not item.isascii():
        raise ValueError("number is not ASCII")
    if vr == "DS":
        if isinstance(item, float):
            return DSfloat(item, auto_format=True)
        if isinstance(item, int | str):
            return DSfloat(str(item).strip() if isinstance(item, str) else item)
    elif vr == "IS" or vr in _INT_VRS:
        if isinstance(item, str):
            item = item.strip()
            return int(item) if vr in _INT_VRS else item
        if isinstance(item, float) and item.is_integer():
            return int(item)
        if isinstance(item, int):
            return item
    elif vr in _FLOAT_VRS and isinstance(item, int | float | str):
        return float(item)
    raise TypeError(f"not a {vr} number")


def _convert_values(values: list[Any], vr: str) -> Any:
    """A DICOM JSON "Value" array as a pydicom element value for the VR."""
    if vr == "SQ":
        return Sequence([dataset_from_json(item) for item in values if isinstance(item, Mapping)])
    converted: list[Any]
    if vr == "PN":
        converted = [_pn_text(item) for item in values]
    elif vr == "AT":
        converted = [_at_tag(item) for item in values]
    elif vr in _INT_VRS or vr in _FLOAT_VRS or vr in ("IS", "DS"):
        if None in values and vr not in ("IS", "DS"):
            raise ValueError(f"null in a {vr} value")  # a binary number has no empty value
        converted = ["" if item is None else _number(item, vr) for item in values]
    elif vr in _BINARY_VRS:
        raise TypeError(f"{vr} values must be InlineBinary or BulkDataURI")
    else:
        if not all(item is None or isinstance(item, str | int | float) for item in values):
            raise TypeError("string value is not a scalar")
        converted = ["" if item is None else str(item) for item in values]
        if vr in _ASCII_VRS and not all(text.isascii() for text in converted):
            raise ValueError(f"{vr} value is not ASCII")
    if not converted:
        return empty_value_for_VR(vr)
    return converted[0] if len(converted) == 1 else converted


def _element_from_json(tag: int, body: Mapping[str, Any]) -> DataElement:
    """One DICOM JSON attribute object as a DataElement; raises on anything malformed."""
    vr = _vr_for(tag, body.get("vr"))
    if "Value" in body:
        values = body["Value"]
        if not isinstance(values, list):
            raise TypeError("Value is not an array")
        value = _convert_values(values, vr)
    elif "InlineBinary" in body:
        encoded = body["InlineBinary"]
        if vr not in _BINARY_VRS or not isinstance(encoded, str):
            raise TypeError("InlineBinary on a non-binary VR or not a string")
        value = base64.b64decode(encoded, validate=True)
    elif "BulkDataURI" in body:
        value = None  # we cannot fetch bulk data here; answer the key empty
    else:
        value = empty_value_for_VR(vr)
    elem = DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)
    if vr != elem.VR:  # pydicom retyped a known tag sent as UN: its value no longer fits
        raise ValueError(f"{vr} value of a tag whose VR is {elem.VR}")
    return elem


def dataset_from_json(obj: Mapping[str, Any]) -> Dataset:
    """Convert a DICOM JSON object (PS3.18 F.2) to a Dataset, skipping malformed attributes."""
    ds = Dataset()
    if not isinstance(obj, Mapping):
        return ds
    for key, body in obj.items():
        if (
            not isinstance(key, str)
            or not _JSON_TAG.fullmatch(key)
            or not isinstance(body, Mapping)
        ):
            logger.debug("skipping malformed DICOM JSON attribute %r", key)
            continue
        tag = int(key, 16)
        try:
            ds.add(_element_from_json(tag, body))
        except Exception as exc:  # one bad attribute must never spoil the whole answer
            logger.debug("skipping DICOM JSON attribute %08X: %s", tag, type(exc).__name__)
    return ds


# ------------------------------------------------------------------------ result -> C-FIND answer


def _empty_like(tag: int, identifier_elem: DataElement) -> DataElement:
    """An empty element for a key the result lacks, with the identifier's (or dictionary) VR."""
    vr = identifier_elem.VR
    if vr not in _KNOWN_VRS or vr == "UN":
        vr = _vr_for(tag, None)
    return DataElement(tag, vr, empty_value_for_VR(vr), validation_mode=pydicom_config.IGNORE)


def _has_non_ascii(ds: Dataset) -> bool:
    """True when any text value (also inside sequences) needs more than ASCII."""
    for elem in ds:
        if elem.VR == "SQ":
            if any(_has_non_ascii(item) for item in elem.value or ()):
                return True
            continue
        if elem.VR not in _TEXT_VRS_ALL or elem.value is None:
            continue
        values: Iterable[Any] = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        if any(not str(v).isascii() for v in values):
            return True
    return False


def shape_response(
    result: Dataset,
    identifier: Dataset,
    level: QueryLevel,
    *,
    retrieve_aet: str | None = None,
) -> Dataset:
    """The C-FIND answer for one QIDO match: exactly the requested keys, nothing QIDO added.

    A unique UID key the result lacks (it was in the QIDO path) is answered from the identifier.
    """
    answer = Dataset()
    for elem in _elements(identifier):
        tag = int(elem.tag)
        if tag in _NEVER_SENT or (tag == RETRIEVE_AE_TITLE and retrieve_aet is not None):
            continue
        if tag in result:
            answer.add(copy.deepcopy(result[tag]))
        elif elem.VR == "UI" and _is_unique_uid(_safe_values(elem)):
            answer.add(copy.deepcopy(elem))
        else:
            answer.add(_empty_like(tag, elem))

    answer.QueryRetrieveLevel = str(level)
    if retrieve_aet is not None:
        answer.RetrieveAETitle = retrieve_aet
    charset = _charset(result) or _charset(identifier)
    if charset is not None:
        answer.add(copy.deepcopy(charset))
    elif _has_non_ascii(answer):
        answer.SpecificCharacterSet = _UTF8_CHARSET  # DICOM JSON is Unicode: say so when needed
    elif SPECIFIC_CHARACTER_SET in identifier:
        answer.add(copy.deepcopy(identifier[SPECIFIC_CHARACTER_SET]))
    return answer


def _safe_values(elem: DataElement) -> list[str]:
    """Element values as text, or none when they are not translatable."""
    try:
        return _values(elem)
    except IdentifierError:
        return []


def _charset(ds: Dataset) -> DataElement | None:
    """The dataset's SpecificCharacterSet element when it has a value."""
    elem = ds.get(SPECIFIC_CHARACTER_SET)
    if isinstance(elem, DataElement) and elem.value not in (None, "", []):
        return elem
    return None


def patient_key(result: Dataset) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID) of a study result, to de-duplicate PATIENT-level answers."""

    def text(keyword: str) -> str:
        value = result.get(keyword)
        if value is None:
            return ""
        if isinstance(value, MultiValue):
            return "\\".join(str(v) for v in value).rstrip(" ")
        return str(value).rstrip(" ")

    return text("PatientID"), text("IssuerOfPatientID")


# ------------------------------------------------------------------------ Number-of-related counts

# The count keys of each level: QIDO-RS gives the study and series ones (PS3.18 10.6.3),
# nothing gives the patient ones (QIDO has no patient resource): those are counted.
_LEVEL_COUNTS = {
    QueryLevel.PATIENT: (
        NUMBER_OF_PATIENT_RELATED_STUDIES,
        NUMBER_OF_PATIENT_RELATED_SERIES,
        NUMBER_OF_PATIENT_RELATED_INSTANCES,
    ),
    QueryLevel.STUDY: (NUMBER_OF_STUDY_RELATED_SERIES, NUMBER_OF_STUDY_RELATED_INSTANCES),
    QueryLevel.SERIES: (NUMBER_OF_SERIES_RELATED_INSTANCES,),
    QueryLevel.IMAGE: (),
}
_PATIENT_IDENTITY_PARAMS = frozenset({"PatientID", "IssuerOfPatientID"})
_NON_MATCHING_PARAMS = frozenset({"includefield", "fuzzymatching"})


def requested_counts(identifier: Dataset, level: QueryLevel) -> frozenset[int]:
    """The Number-of-related keys of the query level that the identifier asks for."""
    return frozenset(tag for tag in _LEVEL_COUNTS[level] if tag in identifier)


def count_of(result: Dataset, tag: int) -> int | None:
    """A count attribute of a QIDO result as a non-negative int; None when absent or malformed."""
    elem = result.get(tag)
    value = elem.value if isinstance(elem, DataElement) else None
    if isinstance(value, MultiValue | list):
        value = value[0] if len(value) == 1 else None
    try:
        count = int(str(value).strip())
    except ValueError:
        return None
    return count if count >= 0 else None


def set_count(result: Dataset, tag: int, count: int) -> None:
    """Put a computed count into a QIDO result, as the IS value the C-FIND answer carries."""
    result.add(DataElement(tag, "IS", str(count)))


def lists_whole_patients(query: QidoQuery) -> bool:
    """True when the query matches on patient identity alone: it lists every study of a patient."""
    return all(
        name in _PATIENT_IDENTITY_PARAMS or name in _NON_MATCHING_PARAMS for name, _ in query.params
    )


def path_uid(value: object) -> str | None:
    """The value as a UID that is safe in a URL path, or None."""
    text = str(value or "").strip(" \x00")
    return text if _is_unique_uid([text]) else None


__all__ = [
    "IdentifierError",
    "QidoQuery",
    "QueryLevel",
    "QueryRoot",
    "build_queries",
    "count_of",
    "dataset_from_json",
    "lists_whole_patients",
    "path_uid",
    "patient_key",
    "requested_counts",
    "set_count",
    "shape_response",
]
