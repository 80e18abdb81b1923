"""Named DIMSE status codes (PS3.4 Annex C/B, PS3.7 Annex C); the only place hex statuses live."""

from enum import IntEnum


class Status(IntEnum):
    """DIMSE status values the adapter answers with."""

    SUCCESS = 0x0000
    # Warnings (C-STORE, PS3.4 B.2.3)
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000  # C-MOVE/C-GET final (alias of 0xB000)
    # Failures
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    CLASS_INSTANCE_CONFLICT = 0x0119
    NO_SUCH_ACTION = 0x0123
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    CANCEL = 0xFE00
    PENDING = 0xFF00

    @property
    def is_success(self) -> bool:
        """True for success."""
        return self is Status.SUCCESS

    @property
    def is_warning(self) -> bool:
        """True for the C-STORE warning range."""
        return is_warning_code(self)


def is_warning_code(code: int) -> bool:
    """True for any code in the warning range 0xBxxx."""
    return (code & 0xF000) == 0xB000


def is_failure_code(code: int) -> bool:
    """True for a 16-bit code that is neither success, warning, pending nor cancel."""
    return 0 < code <= 0xFFFF and not is_warning_code(code) and code not in (0xFE00, 0xFF00, 0xFF01)


def is_stored(code: int) -> bool:
    """True when a C-STORE status means the instance was stored (success or warning)."""
    return code == Status.SUCCESS or is_warning_code(code)
