"""The transfer syntaxes the gateway understands, in one table.

Every decision elsewhere (what to negotiate, what to convert to, whether a
conversion is lossy) reads this table, so adding a codec means adding or
changing one row here plus its encode/decode function.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from gateway.codecs.errors import TranscodeError


class Fidelity(enum.Enum):
    """What a transfer syntax permits for the pixel data it carries."""

    LOSSLESS = "lossless"
    LOSSY = "lossy"
    EITHER = "either"  # the sender chooses, e.g. JPEG 2000 (.4.91) and HTJ2K (.4.203)


@dataclass(frozen=True)
class SyntaxInfo:
    """One transfer syntax and what this gateway can do with it.

    ``encode_lossless`` says whether *our* encoder for the syntax preserves
    pixel values: for the EITHER syntaxes we always write reversible
    codestreams, so converting into them loses nothing.
    """

    uid: UID
    encapsulated: bool
    fidelity: Fidelity
    can_decode: bool
    can_encode: bool
    encode_lossless: bool

    @property
    def name(self) -> str:
        return self.uid.name

    @property
    def native(self) -> bool:
        return not self.encapsulated


def _row(
    uid: str, encapsulated: bool, fidelity: Fidelity, decode: bool, encode: bool
) -> SyntaxInfo:
    return SyntaxInfo(
        uid=UID(uid),
        encapsulated=encapsulated,
        fidelity=fidelity,
        can_decode=decode,
        can_encode=encode,
        encode_lossless=encode and fidelity is not Fidelity.LOSSY,
    )


IMPLICIT_VR_LE = UID("1.2.840.10008.1.2")
EXPLICIT_VR_LE = UID("1.2.840.10008.1.2.1")
DEFLATED_EXPLICIT_VR_LE = UID("1.2.840.10008.1.2.1.99")
EXPLICIT_VR_BE = UID("1.2.840.10008.1.2.2")
JPEG_BASELINE = UID("1.2.840.10008.1.2.4.50")
JPEG_EXTENDED = UID("1.2.840.10008.1.2.4.51")
JPEG_LOSSLESS = UID("1.2.840.10008.1.2.4.57")
JPEG_LOSSLESS_SV1 = UID("1.2.840.10008.1.2.4.70")
JPEG_LS_LOSSLESS = UID("1.2.840.10008.1.2.4.80")
JPEG_LS_NEAR_LOSSLESS = UID("1.2.840.10008.1.2.4.81")
JPEG2000_LOSSLESS = UID("1.2.840.10008.1.2.4.90")
JPEG2000 = UID("1.2.840.10008.1.2.4.91")
HTJ2K_LOSSLESS = UID("1.2.840.10008.1.2.4.201")
HTJ2K_LOSSLESS_RPCL = UID("1.2.840.10008.1.2.4.202")
HTJ2K = UID("1.2.840.10008.1.2.4.203")
RLE_LOSSLESS = UID("1.2.840.10008.1.2.5")

_L, _Y, _E = Fidelity.LOSSLESS, Fidelity.LOSSY, Fidelity.EITHER

# JPEG-LS, JPEG lossless and JPEG extended are decode-only: pydicom has no
# encoder for them without pyjpegls/GDCM, and a peer that accepts compressed
# data at all is served by the uncompressed and J2K/HTJ2K/RLE targets.
SYNTAXES: dict[UID, SyntaxInfo] = {
    info.uid: info
    for info in (
        # _row(uid, encapsulated, fidelity, can_decode, can_encode)
        _row(IMPLICIT_VR_LE, False, _L, True, True),
        _row(EXPLICIT_VR_LE, False, _L, True, True),
        _row(DEFLATED_EXPLICIT_VR_LE, False, _L, True, True),
        _row(EXPLICIT_VR_BE, False, _L, True, True),
        _row(JPEG_BASELINE, True, _Y, True, True),
        _row(JPEG_EXTENDED, True, _Y, True, False),
        _row(JPEG_LOSSLESS, True, _L, True, False),
        _row(JPEG_LOSSLESS_SV1, True, _L, True, False),
        _row(JPEG_LS_LOSSLESS, True, _L, True, False),
        _row(JPEG_LS_NEAR_LOSSLESS, True, _Y, True, False),
        _row(JPEG2000_LOSSLESS, True, _L, True, True),
        _row(JPEG2000, True, _E, True, True),
        _row(HTJ2K_LOSSLESS, True, _L, True, True),
        _row(HTJ2K_LOSSLESS_RPCL, True, _L, True, True),
        _row(HTJ2K, True, _E, True, True),
        _row(RLE_LOSSLESS, True, _L, True, True),
    )
}

JPEG_FAMILY = frozenset({JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1})
HTJ2K_FAMILY = frozenset({HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K})
JPEG2000_FAMILY = frozenset({JPEG2000_LOSSLESS, JPEG2000})


def syntax_info(uid: str) -> SyntaxInfo:
    """Return the table row for `uid`, or raise TranscodeError naming it."""
    key = UID(str(uid).strip())
    try:
        return SYNTAXES[key]
    except KeyError:
        name = key.name if key.name != key else "unknown"
        raise TranscodeError(
            f"transfer syntax {key} ({name}) is not handled by the gateway codecs"
        ) from None


def rgb_on_decode(uid: UID) -> bool:
    """Whether converting out of `uid` should turn YBR colour into RGB.

    JPEG (10918) codecs hold colour as YCbCr internally, so the conversion is
    what pydicom's decompress does and what receivers expect. Everything else
    keeps its stored colour space so that the pixel values stay exact.
    """
    return uid in JPEG_FAMILY


def source_syntax(ds: Dataset) -> UID:
    """The dataset's stored transfer syntax, or TranscodeError if it has none."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise TranscodeError(
            "dataset has no file_meta (0002,0010) Transfer Syntax UID, "
            "so its pixel encoding is unknown"
        )
    return UID(str(uid).strip())
