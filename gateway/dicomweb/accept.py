"""The ``Accept`` header of a DICOMweb request (RFC 9110 12.5.1, PS3.18 8.7).

Clients send several media ranges in one header (OHIF asks metadata with
``application/dicom+json, multipart/related; type=application/octet-stream;
transfer-syntax=*``), with q-values, and write ``type`` and ``transfer-syntax``
quoted or not. Parsed once here into `MediaRange` values, best first.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaRange:
    """One media range: ``media`` lower case, parameters with lower-case names and
    unquoted values (``type``, ``transfer-syntax``), and its q-value."""

    media: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str:
        """The ``type`` parameter of a multipart range (lower case), "" when absent."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def matches(self, media: str) -> bool:
        """Whether this range admits ``media`` (``*/*`` and ``type/*`` included)."""
        if self.media in ("*/*", "*"):
            return True
        if self.media.endswith("/*"):
            return media.split("/", 1)[0] == self.media[:-2]
        return self.media == media


def _split(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def parse_media_range(text: str) -> MediaRange | None:
    """One media range; None when it is empty or unreadable (ignored, as RFC 9110 lets)."""
    pieces = _split(text, ";")
    media = pieces[0].strip().lower()
    if not media or "/" not in media and media != "*":
        return None
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, sep, value = piece.partition("=")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip().strip('"').strip()
        if name == "q":
            try:
                q = min(max(float(value), 0.0), 1.0)
            except ValueError:
                q = 0.0
            continue
        params[name] = value
    return MediaRange(media, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best first (ties keep the client's order); an
    absent or empty header is ``*/*``. Ranges with q=0 are left out."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [r for r in (parse_media_range(p) for p in _split(header, ",")) if r is not None and r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def with_query(header: str | None, asked: list[str]) -> str | None:
    """The Accept a request negotiates with when it carries ``accept`` query
    parameters (PS3.18 8.3.3.1, for hyperlinks: a browser's ``<img>`` or a link in a
    report cannot set the header): their media types first, each only where a range of
    the Accept header admits it (a missing header admits all), then the header's own
    ranges. None of them admitted: the header alone."""
    if not asked:
        return header
    header_ranges = parse_accept(header)
    admitted = [
        text.strip()
        for value in asked
        for text in _split(value, ",")
        if (media := parse_media_range(text)) is not None and any(r.matches(media.media) for r in header_ranges)
    ]
    if not admitted:
        return header
    return ", ".join(admitted + ([header] if header and header.strip() else []))

