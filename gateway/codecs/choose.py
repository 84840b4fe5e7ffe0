"""Pick the transfer syntax to send an instance in, given what the peer accepted."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from pydicom.dataset import Dataset
from pydicom.uid import UID

from gateway.codecs.description import PixelDescription
from gateway.codecs.frames import encode_problem
from gateway.codecs.syntaxes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    IMPLICIT_VR_LE,
    JPEG2000,
    JPEG2000_LOSSLESS,
    RLE_LOSSLESS,
    SYNTAXES,
    SyntaxInfo,
    rgb_on_decode,
    source_syntax,
)

# Uncompressed first (cheapest, understood by everyone), then lossless
# compressions; JPEG 2000 (.91) and HTJ2K (.203) get reversible codestreams
# from us, so they are lossless targets too. Deflate and big endian last.
LOSSLESS_PREFERENCE: tuple[UID, ...] = (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG2000_LOSSLESS,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    JPEG2000,
    HTJ2K,
    RLE_LOSSLESS,
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
)
LOSSY_PREFERENCE: tuple[UID, ...] = tuple(
    info.uid for info in SYNTAXES.values() if info.can_encode and not info.encode_lossless
)
NATIVE_PREFERENCE: tuple[UID, ...] = tuple(
    uid for uid in LOSSLESS_PREFERENCE if SYNTAXES[uid].native
)


def choose_transfer_syntax(
    source_ts: str,
    accepted: Iterable[str],
    allow_lossy: bool = False,
    *,
    has_pixel_data: bool = True,
    desc: PixelDescription | None = None,
    preferred: Sequence[str] = (),
) -> UID | None:
    """Return the syntax to send in, or None if no accepted syntax will do.

    First the first accepted of ``preferred`` (a peer's own order) that can carry
    the instance. Then the stored syntax when accepted (no conversion). Otherwise the first
    accepted entry of LOSSLESS_PREFERENCE we can produce, then — only with
    `allow_lossy` — a lossy one. Without pixel data any native syntax works.
    Given `desc`, targets whose encoder cannot take this pixel format are
    skipped (e.g. 32-bit RT Dose never goes to RLE).
    """
    source = UID(str(source_ts).strip())
    offered = {UID(str(uid).strip()) for uid in accepted}
    info = SYNTAXES.get(source)
    for uid in (UID(str(u).strip()) for u in preferred):
        target = SYNTAXES.get(uid)
        if uid not in offered or target is None:
            continue
        if uid == source or (not has_pixel_data and target.native):
            return uid
        lossless = target.encode_lossless or allow_lossy
        if has_pixel_data and info is not None and info.can_decode and lossless and _feasible(info, target, desc):
            return uid
    if source in offered:
        return source
    if not has_pixel_data:
        return next((uid for uid in NATIVE_PREFERENCE if uid in offered), None)
    if info is None or not info.can_decode:
        return None
    candidates = LOSSLESS_PREFERENCE + (LOSSY_PREFERENCE if allow_lossy else ())
    for uid in candidates:
        if uid in offered and _feasible(info, SYNTAXES[uid], desc):
            return uid
    return None


def choose_for_dataset(
    ds: Dataset, accepted: Iterable[str], *, allow_lossy: bool = False
) -> UID | None:
    """choose_transfer_syntax with source, pixel presence and format read from `ds`."""
    accepted = list(accepted)
    source = source_syntax(ds)
    has_pixels = "PixelData" in ds
    needs_desc = has_pixels and source not in {UID(str(u).strip()) for u in accepted}
    return choose_transfer_syntax(
        source,
        accepted,
        allow_lossy,
        has_pixel_data=has_pixels,
        desc=PixelDescription.from_dataset(ds) if needs_desc else None,
    )


def _feasible(source: SyntaxInfo, target: SyntaxInfo, desc: PixelDescription | None) -> bool:
    if source.native and target.native:
        return True  # bytes are kept, at most byte-swapped
    if desc is None:
        return True
    return encode_problem(target.uid, _after_decode(desc, source.uid)) is None


def _after_decode(desc: PixelDescription, source: UID) -> PixelDescription:
    """Predict the description transcode's decoder hands to the encoder."""
    pi = desc.photometric_interpretation
    if pi in ("YBR_RCT", "YBR_ICT") or (rgb_on_decode(source) and pi.startswith("YBR_FULL")):
        pi = "RGB"
    elif pi == "YBR_FULL_422":
        pi = "YBR_FULL"  # pydicom expands the subsampling
    return replace(desc, photometric_interpretation=pi, planar_configuration=0)
