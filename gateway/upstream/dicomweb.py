"""A generic DICOMweb archive (Orthanc, dcm4chee, Azure, Google) reached over HTTP(S)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from email.utils import parsedate_to_datetime

import aiohttp

from gateway.config import UpstreamConfig
from gateway.dicomweb import mediatypes
from gateway.dicomweb.auth import auth_headers
from gateway.dicomweb.multipart import FileMultipart
from gateway.dicomweb.stow import ALREADY_STORED, TRANSIENT, parse_stow_response
from gateway.spool.queue import Outcome, SpooledInstance
from gateway.upstream.base import Health

log = logging.getLogger("gateway.upstream")

RETRYABLE_HTTP = frozenset({408, 429}) | frozenset(range(500, 600))


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _short(body: bytes, limit: int = 200) -> str:
    """A one-line excerpt of an error body for logs and the spool's last_error."""
    text = body[:limit].decode("utf-8", "replace")
    return " ".join(text.split())


class DicomWebUpstream:
    """STOW-RS (and later QIDO-RS/WADO-RS) against one base URL."""

    kind = "dicomweb"

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = True if self.cfg.verify_tls else False
        self._session = aiohttp.ClientSession(
            headers=auth_headers(self.cfg.auth),
            timeout=aiohttp.ClientTimeout(
                total=self.cfg.timeout, sock_connect=self.cfg.connect_timeout
            ),
            connector=aiohttp.TCPConnector(limit=64, ssl=ssl_ctx),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("DicomWebUpstream used before start()")
        return self._session

    async def store_instances(
        self, study_uid: str, instances: list[SpooledInstance]
    ) -> list[Outcome]:
        body = FileMultipart([(i.path, i.size) for i in instances], mediatypes.DICOM)
        headers = {
            "Content-Type": mediatypes.multipart_related(mediatypes.DICOM, body.boundary),
            "Content-Length": str(body.content_length),
            "Accept": mediatypes.DICOM_JSON,
        }
        url = f"{self.url}/studies/{study_uid}"

        def all_(kind: str, error: str, retry_after: float | None = None) -> list[Outcome]:
            return [Outcome(i.id, kind, error, retry_after) for i in instances]

        try:
            async with self.session.post(url, data=body, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "")
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return all_("retry", f"timeout after {self.cfg.timeout:g}s posting to {url}")
        except aiohttp.ClientError as exc:
            return all_("retry", f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return all_("retry", f"cannot read spool file: {exc}")

        if status in RETRYABLE_HTTP:
            return all_("retry", f"HTTP {status}: {_short(payload)}", retry_after)
        parsed = parse_stow_response(payload, content_type)
        if status >= 400 and status != 409:
            return all_("rejected", f"HTTP {status}: {_short(payload)}")
        if not parsed.parsed:
            if status == 409:
                return all_("rejected", f"HTTP 409 without a readable response: {_short(payload)}")
            # A 2xx with no Store Instances Response: the request as a whole succeeded.
            return all_("delivered", "")

        outcomes = []
        for inst in instances:
            uid = inst.sop_instance_uid
            if uid in parsed.failed:
                reason = parsed.failed[uid]
                if reason in ALREADY_STORED:
                    outcomes.append(Outcome(inst.id, "delivered", "already stored upstream"))
                elif reason in TRANSIENT:
                    outcomes.append(
                        Outcome(inst.id, "retry", f"HTTP {status}, failure reason {reason:#06x}")
                    )
                else:
                    outcomes.append(
                        Outcome(inst.id, "rejected", f"HTTP {status}, failure reason {reason:#06x}")
                    )
            elif uid in parsed.referenced:
                outcomes.append(Outcome(inst.id, "delivered", ""))
            else:
                outcomes.append(
                    Outcome(inst.id, "retry", f"HTTP {status}: instance missing from the response")
                )
        return outcomes

    async def health(self) -> Health:
        try:
            async with self.session.get(
                f"{self.url}/studies",
                params={"limit": "1"},
                headers={"Accept": mediatypes.DICOM_JSON},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                await resp.read()
                if resp.status < 400:
                    return Health(True, f"HTTP {resp.status}")
                return Health(False, f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Health(False, f"{type(exc).__name__}: {exc}".strip())
