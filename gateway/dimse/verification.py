"""C-ECHO to a configured peer, from the gateway's own AE title and address.

For ``dicom-gateway peers --echo``: a C-MOVE destination that will refuse the gateway
(its AE title not registered on the workstation, a firewall, a wrong port) shows up
here, in the words of the rejection, before a radiologist's move fails on it.
"""

from __future__ import annotations

import time

from gateway.config import Config, Peer
from gateway.dimse.command import VERIFICATION
from gateway.dimse.requestor import UNCOMPRESSED, RequestorError, StoreRequestor


async def echo_peer(config: Config, peer: Peer, timeout: float) -> tuple[bool, str]:
    """(answered Success, what happened): the association, one C-ECHO, the release."""
    started = time.monotonic()
    try:
        requestor = await StoreRequestor.to_peer(config, peer, [(VERIFICATION, list(UNCOMPRESSED))], timeout=timeout)
    except RequestorError as exc:
        return False, str(exc)
    try:
        contexts = requestor.accepted.get(VERIFICATION)
        if not contexts:
            return False, "association accepted, but not the Verification SOP Class (no C-ECHO)"
        status = await requestor.echo(next(iter(contexts.values())))
    except RequestorError as exc:
        return False, str(exc)
    finally:
        await requestor.release(timeout)
    elapsed = (time.monotonic() - started) * 1000
    return status == 0, f"C-ECHO answered 0x{status:04X} in {elapsed:.0f} ms"
