"""C-STORE → STOW-RS: read the instance's identity, upload it, map the answer to a DIMSE status."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_adapter.dicom.attributes import InstanceIdentity, read_identity
from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.stow import StowResponse, failure_comment, status_for
from dicom_adapter.spool.base import StoreOutcome
from dicom_adapter.status import Status, is_stored, is_warning_code

logger = logging.getLogger(__name__)


def _already_there(response: StowResponse, sop_instance_uid: str) -> bool:
    """True when the STOW answer says this instance exists already (409, or 0x0111 for it)."""
    if response.http_status == 409 and sop_instance_uid not in response.referenced:
        return True
    return response.failed.get(sop_instance_uid) == Status.DUPLICATE_SOP_INSTANCE


class StoreService:
    """Uploads received instances to the DICOMweb server."""

    def __init__(
        self, client: DicomwebClient, *, stow_url: str, dicomweb_root: str, overwrite: bool
    ) -> None:
        self._client = client
        self._stow_url = stow_url
        self._root = dicomweb_root or stow_url.rstrip("/").removesuffix("/studies")
        self._overwrite = overwrite

    async def store_file(self, path: Path) -> StoreOutcome:
        """Validate the received dataset, then store it (raises InvalidDatasetError first)."""
        return await self.store_answer(path, read_identity(path))

    async def store(self, path: Path, identity: InstanceIdentity) -> int:
        """STOW one instance and return the DIMSE status for the C-STORE-RSP.

        Every request this makes (retries, overwrite, the existence check) ends within one
        retry deadline, so the C-STORE is answered before the peer gives up on it.
        """
        return (await self.store_answer(path, identity)).status

    async def store_answer(self, path: Path, identity: InstanceIdentity) -> StoreOutcome:
        """`store` with the outcome: the status and, for a failure, its ErrorComment."""
        with self._client.one_deadline():
            return await self._store(path, identity)

    async def store_outcome(
        self, path: Path, identity: InstanceIdentity, *, may_exist: bool = False
    ) -> StoreOutcome:
        """`store` with the HTTP answer, for spooled instances (their uploader logs failures).

        `may_exist`: a 409/0x0111 is checked upstream first (an earlier run may have stored it).
        """
        with self._client.one_deadline():
            return await self._store(
                path, identity, may_exist=may_exist and not self._overwrite, failure_level=None
            )

    async def store_batch(
        self, items: Sequence[tuple[Path, InstanceIdentity]], *, may_exist: bool = False
    ) -> list[StoreOutcome]:
        """Several spooled instances in ONE STOW-RS request; an outcome for each, in order.

        Each instance's outcome comes from the answer's Referenced/Failed SOP sequences, so
        one refused instance does not fail the others stored by the same request.
        """
        with self._client.one_deadline():
            response = await self._client.stow(self._stow_url, [path for path, _ in items])
            check = may_exist and not self._overwrite
            return [
                await self._settle(response, path, identity, may_exist=check, failure_level=None)
                for path, identity in items
            ]

    async def _store(
        self,
        path: Path,
        identity: InstanceIdentity,
        *,
        may_exist: bool = False,
        failure_level: int | None = logging.ERROR,
    ) -> StoreOutcome:
        response = await self._client.stow(self._stow_url, [path])
        return await self._settle(
            response, path, identity, may_exist=may_exist, failure_level=failure_level
        )

    async def _settle(
        self,
        response: StowResponse,
        path: Path,
        identity: InstanceIdentity,
        *,
        may_exist: bool,
        failure_level: int | None,
    ) -> StoreOutcome:
        """One instance's outcome from a STOW answer (existence check, overwrite, logging)."""
        status = status_for(response, identity.sop_instance_uid)
        if (response.attempts > 1 or may_exist) and _already_there(
            response, identity.sop_instance_uid
        ):
            # an earlier attempt's answer was lost: it may be that attempt which stored it
            if await self._is_stored(identity):
                logger.info(
                    "instance already stored by an earlier attempt whose answer was lost",
                    extra={"sop_instance_uid": identity.sop_instance_uid},
                )
                return StoreOutcome(Status.SUCCESS, response.http_status)
        elif (
            response.http_status == 409 and status == Status.PROCESSING_FAILURE and self._overwrite
        ):
            logger.info(
                "instance exists upstream; overwriting",
                extra={"sop_instance_uid": identity.sop_instance_uid},
            )
            await self._client.delete(
                f"{self._root}/studies/{identity.study_uid}/series/{identity.series_uid}"
                f"/instances/{identity.sop_instance_uid}"
            )
            response = await self._client.stow(self._stow_url, [path])
            status = status_for(response, identity.sop_instance_uid)
        if status != Status.SUCCESS:
            failed = failure_level if failure_level is not None else logging.DEBUG
            level = logging.WARNING if is_warning_code(status) else failed
            logger.log(
                level,
                "STOW-RS of instance gave HTTP %d -> C-STORE status 0x%04X%s",
                response.http_status,
                status,
                f" ({response.body_excerpt[:160]!r})" if response.body_excerpt else "",
                extra={"sop_instance_uid": identity.sop_instance_uid},
            )
        comment = "" if is_stored(status) else failure_comment(response, identity.sop_instance_uid)
        uid = identity.sop_instance_uid
        named = uid in response.referenced or uid in response.failed
        return StoreOutcome(status, response.http_status, response.body_excerpt, comment, named)

    async def _is_stored(self, identity: InstanceIdentity) -> bool:
        """QIDO-RS by SOP Instance UID: is this instance upstream, with the same SOP class?"""
        if identity.study_uid and identity.series_uid:
            url = (
                f"{self._root}/studies/{identity.study_uid}/series/{identity.series_uid}/instances"
            )
        else:
            url = f"{self._root}/instances"
        params = [("SOPInstanceUID", identity.sop_instance_uid), ("includefield", "00080016")]
        async for match in self._client.qido(url, params):
            if (
                _json_value(match, "00080018") == identity.sop_instance_uid
                and _json_value(match, "00080016") == identity.sop_class_uid
            ):
                return True
        return False


def _json_value(match: dict[str, Any], tag: str) -> str:
    """The first value of `tag` in a DICOM JSON object, as a string ("" when absent)."""
    element = match.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values:
        return str(values[0]).strip()
    return ""
