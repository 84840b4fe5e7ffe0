"""A pynetdicom C-STORE SCU for transfer syntaxes dcmtk 3.6.7 cannot send.

dcmtk 3.6.7 does not know HTJ2K (1.2.840.10008.1.2.4.201-.203) or JPEG XL:
it negotiates such a UID but then refuses to encode the data set (see
:mod:`tests.support.dcmtk`). pynetdicom, given a file path, sends the stored
data set bytes as they are without decoding them, so any transfer syntax the
peer accepts can be exercised.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, Association, _config
from pynetdicom.dimse_primitives import C_ECHO

LOOPBACK = "127.0.0.1"

#: pynetdicom allows at most 128 proposed presentation contexts.
_MAX_CONTEXTS = 128


VERIFICATION = "1.2.840.10008.1.1"


def echo(assoc: Association, msg_id: int = 99) -> int:
    """A C-ECHO on an established pynetdicom association: the status of its response,
    or -1 when none came within the association's DIMSE timeout.

    pynetdicom's own ``send_c_echo`` pauses the association's reactor by clearing its
    checkpoint and waiting for the reactor's paused flag; right after another
    ``send_*`` (which sets the checkpoint again) the flag can still say paused while
    the reactor runs on, and the reactor then takes the response as an unexpected
    message ("Received unexpected C-ECHO service message") and the echo times out.
    Here the reactor is given time to reach its checkpoint before the flag is trusted.
    """
    assoc._reactor_checkpoint.clear()
    time.sleep(0.05)  # a reactor step is a millisecond's sleep and a few checks
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        request = C_ECHO()
        request.MessageID = msg_id
        request.AffectedSOPClassUID = VERIFICATION
        context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == VERIFICATION)
        assoc.dimse.send_msg(request, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None or rsp.MessageIDBeingRespondedTo != msg_id:
        return -1
    return int(rsp.Status)


def send_files(
    port: int,
    paths: Iterable[Path | str],
    called_ae: str,
    calling_ae: str = "PYSCU",
    host: str = LOOPBACK,
    timeout: float = 30.0,
) -> list[int]:
    """C-STORE each file in its own stored transfer syntax, in one association.

    Proposes one presentation context per (SOP Class, transfer syntax) pair
    found in the files' meta headers, so nothing is transcoded. Returns the
    C-STORE status per file, in order; ``-1`` means there was no response
    (no accepted context for that file, abort, timeout). Raises
    AssertionError if no association is established, which is also what
    happens when the peer accepts none of the proposed contexts (Orthanc 1.10
    with an HTJ2K file), so a refusal is never mistaken for success.
    """
    files = [Path(p) for p in paths]
    pairs: list[tuple[str, str]] = []
    for path in files:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        pair = (str(meta.file_meta.MediaStorageSOPClassUID), str(meta.file_meta.TransferSyntaxUID))
        if pair not in pairs:
            pairs.append(pair)
    if len(pairs) > _MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} (SOP class, syntax) pairs exceed {_MAX_CONTEXTS} presentation contexts")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise AssertionError(
            f"no association with {called_ae} at {host}:{port}: rejected, or no presentation context accepted"
        )
    statuses: list[int] = []
    # Send the stored bytes without parsing them, so broken data sets go out as they are.
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for path in files:
            try:
                status = assoc.send_c_store(path)
            except ValueError:
                statuses.append(-1)
                continue
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
    return statuses
