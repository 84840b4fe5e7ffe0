"""AWS Signature Version 4, verified the way an AWS service does, from the specification.

Written from the published algorithm (IAM user guide, "Create a signed AWS API
request"; S3's "chunked upload" for the streaming payload) and deliberately not from
botocore, so that a signer and this verifier agreeing means both follow the spec:

* canonical request: method, canonical URI (the path as sent, dot segments removed,
  then URI-encoded again: services other than S3 encode each segment twice),
  canonical query string (each name and value decoded, URI-encoded with only the
  unreserved characters left as they are, sorted by name then value), canonical
  headers (the signed ones, lower-cased, values trimmed with inner runs of spaces
  collapsed, repeated headers joined by commas), the signed header list, the
  payload hash;
* string to sign: algorithm, timestamp, credential scope, hash of the canonical
  request; signing key: HMAC chain over date, region, service, ``aws4_request``
  starting from ``"AWS4" + secret``;
* payload hash: the body's SHA-256, or the literal ``UNSIGNED-PAYLOAD``, or
  ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``: then either an ``aws-chunked`` body whose
  every chunk carries a signature chained from the request's, or (the form of
  HealthImaging's own STOW-RS curl example) the plain body with
  ``x-amz-decoded-content-length`` giving its length;
* a request time more than five minutes away from the server's clock is refused.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from multidict import CIMultiDictProxy

from tests.support.healthimaging.identity import AuthFailure, Identities

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
SKEW_SECONDS = 300
TERMINATOR = "aws4_request"

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_AMZ_DATE = "%Y%m%dT%H%M%SZ"


def uri_encode(data: bytes, keep_slash: bool = False) -> str:
    """RFC 3986 encoding as SigV4 defines it: unreserved bytes as they are, every
    other byte as ``%XX`` with upper-case hex (``/`` kept in paths)."""
    out = []
    for byte in data:
        if byte in _UNRESERVED or (keep_slash and byte == 0x2F):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on a path, plus collapsing empty segments."""
    output: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if output:
                output.pop()
            continue
        output.append(segment)
    normalized = "/" + "/".join(output)
    if path.endswith("/") and output:
        normalized += "/"
    return normalized


def canonical_uri(raw_path: str) -> str:
    """The path exactly as it came on the request line, normalized, encoded again."""
    return uri_encode(_remove_dot_segments(raw_path or "/").encode("utf-8"), keep_slash=True)


def canonical_query(raw_query: str) -> str:
    """Each parameter decoded from what was sent, re-encoded, sorted."""
    pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&") if raw_query else []:
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((uri_encode(unquote_to_bytes(name)), uri_encode(unquote_to_bytes(value))))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _trimall(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: CIMultiDictProxy[str], signed: list[str]) -> str:
    """A signed header absent from the request counts as empty: curl signs
    ``x-amz-security-token:`` as empty and sends nothing when the vendor's examples run
    with long-term keys (``$AWS_SESSION_TOKEN`` unset), and the service accepts that."""
    lines = []
    for name in signed:
        values = headers.getall(name, [])
        lines.append(f"{name}:{','.join(_trimall(v) for v in values)}\n")
    return "".join(lines)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, service, TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def _hex_hmac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Authorization:
    access_key: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: list[str]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{self.terminator}"


_AUTH_PARAM = re.compile(r"\s*([A-Za-z]+)\s*=\s*([^,\s]*)\s*")


def parse_authorization(value: str) -> Authorization:
    """``AWS4-HMAC-SHA256 Credential=AK/date/region/service/aws4_request,
    SignedHeaders=a;b, Signature=hex``; anything else is an incomplete signature."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AuthFailure(400, "IncompleteSignatureException", f"Unsupported AWS 'algorithm': '{algorithm}'")
    params: dict[str, str] = {}
    for item in rest.split(","):
        match = _AUTH_PARAM.fullmatch(item)
        if match:
            params[match.group(1)] = match.group(2)
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not params.get(k)]
    if missing:
        raise AuthFailure(
            400, "IncompleteSignatureException",
            f"Authorization header requires {', '.join(repr(k) for k in missing)} parameter(s). Authorization={value}",
        )
    credential = params["Credential"].split("/")
    if len(credential) != 5:
        raise AuthFailure(400, "IncompleteSignatureException", f"Credential is malformed: {params['Credential']}")
    return Authorization(
        access_key=credential[0],
        date=credential[1],
        region=credential[2],
        service=credential[3],
        terminator=credential[4],
        signed_headers=params["SignedHeaders"].split(";"),
        signature=params["Signature"],
    )


@dataclass(frozen=True)
class Verified:
    """A request whose signature held: who signed it and the payload it carried."""

    access_key: str
    body: bytes


def _request_time(headers: Mapping[str, str]) -> tuple[str, float]:
    stamp = headers.get("x-amz-date")
    if stamp:
        try:
            return stamp, float(calendar.timegm(time.strptime(stamp, _AMZ_DATE)))
        except ValueError:
            raise AuthFailure(400, "IncompleteSignatureException", f"Date must be in ISO-8601 'basic format'. Got '{stamp}'") from None
    # The spec also allows a Date header; no AWS SDK or curl sends one for SigV4.
    raise AuthFailure(400, "IncompleteSignatureException", "Authorization header requires existence of a 'X-Amz-Date' header.")


def _check_skew(stamp: str, when: float, now: float) -> None:
    if when < now - SKEW_SECONDS:
        raise AuthFailure(
            403, "InvalidSignatureException",
            f"Signature expired: {stamp} is now earlier than {time.strftime(_AMZ_DATE, time.gmtime(now - SKEW_SECONDS))} "
            f"({time.strftime(_AMZ_DATE, time.gmtime(now))} - 5 min.)",
        )
    if when > now + SKEW_SECONDS:
        raise AuthFailure(
            403, "InvalidSignatureException",
            f"Signature not yet current: {stamp} is still later than {time.strftime(_AMZ_DATE, time.gmtime(now + SKEW_SECONDS))} "
            f"({time.strftime(_AMZ_DATE, time.gmtime(now))} + 5 min.)",
        )


SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def verify(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: CIMultiDictProxy[str],
    body: bytes,
    *,
    identities: Identities,
    region: str,
    service: str,
    now: float,
) -> Verified:
    """Check one request as the service would; raise AuthFailure when it does not hold."""
    header = headers.get("Authorization")
    if not header:
        raise AuthFailure(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    auth = parse_authorization(header)
    stamp, when = _request_time(headers)
    if auth.terminator != TERMINATOR:
        raise AuthFailure(403, "InvalidSignatureException", f"Credential should be scoped with a valid terminator: '{TERMINATOR}'.")
    if auth.service != service:
        raise AuthFailure(403, "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'.")
    if auth.region != region:
        raise AuthFailure(403, "InvalidSignatureException", f"Credential should be scoped to a valid region, not '{auth.region}'.")
    if auth.date != stamp[:8]:
        raise AuthFailure(
            403, "InvalidSignatureException",
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{auth.date}' != '{stamp[:8]}'",
        )
    if "host" not in auth.signed_headers:
        raise AuthFailure(403, "InvalidSignatureException", "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    if auth.signed_headers != sorted(auth.signed_headers) or any(h != h.lower() for h in auth.signed_headers):
        raise AuthFailure(403, "InvalidSignatureException", SIGNATURE_MISMATCH)
    _check_skew(stamp, when, now)
    secret = identities.secret_for(auth.access_key, headers.get("x-amz-security-token"), now)

    declared = headers.get("x-amz-content-sha256")
    if declared in (UNSIGNED_PAYLOAD, STREAMING_PAYLOAD):
        payload_hash = declared
    else:
        # The service hashes what it received: a declared hash that is not the body's
        # makes the signature fail to verify.
        payload_hash = hashlib.sha256(body).hexdigest()
    canonical = "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            canonical_headers(headers, auth.signed_headers),
            ";".join(auth.signed_headers),
            payload_hash,
        ]
    )
    string_to_sign = "\n".join([ALGORITHM, stamp, auth.scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = signing_key(secret, auth.date, auth.region, auth.service)
    if not hmac.compare_digest(_hex_hmac(key, string_to_sign), auth.signature):
        raise AuthFailure(403, "InvalidSignatureException", SIGNATURE_MISMATCH)
    if declared == STREAMING_PAYLOAD:
        body = _streamed_payload(headers, body, key, stamp, auth)
    return Verified(auth.access_key, body)


def _streamed_payload(headers: CIMultiDictProxy[str], body: bytes, key: bytes, stamp: str, auth: Authorization) -> bytes:
    """The payload of a STREAMING-AWS4-HMAC-SHA256-PAYLOAD request, checked."""
    declared_length = headers.get("x-amz-decoded-content-length")
    if declared_length is None or not declared_length.isdigit():
        raise AuthFailure(400, "ValidationException", "x-amz-decoded-content-length is required with a streaming payload")
    encodings = [e.strip().lower() for e in headers.get("Content-Encoding", "").split(",")]
    payload = decode_chunks(body, key, stamp, auth) if "aws-chunked" in encodings else body
    if len(payload) != int(declared_length):
        raise AuthFailure(
            400, "ValidationException",
            f"x-amz-decoded-content-length {declared_length} does not match the {len(payload)} bytes received",
        )
    return payload


def decode_chunks(body: bytes, key: bytes, stamp: str, auth: Authorization) -> bytes:
    """An ``aws-chunked`` body: ``hex-size;chunk-signature=sig CRLF data CRLF`` ... up
    to a zero-size chunk, each signature chained from the previous one."""
    previous = auth.signature
    payload = bytearray()
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise AuthFailure(400, "IncompleteSignatureException", "aws-chunked body: chunk header without CRLF")
        size_text, _, extension = body[pos:end].decode("ascii", "replace").partition(";")
        name, _, signature = extension.partition("=")
        try:
            size = int(size_text, 16)
        except ValueError:
            raise AuthFailure(400, "IncompleteSignatureException", f"aws-chunked body: bad chunk size {size_text!r}") from None
        if name != "chunk-signature" or not signature:
            raise AuthFailure(400, "IncompleteSignatureException", "aws-chunked body: chunk without chunk-signature")
        data = body[end + 2 : end + 2 + size]
        if len(data) != size or body[end + 2 + size : end + 4 + size] != b"\r\n":
            raise AuthFailure(400, "IncompleteSignatureException", "aws-chunked body: chunk shorter than its size")
        string_to_sign = "\n".join(
            ["AWS4-HMAC-SHA256-PAYLOAD", stamp, auth.scope, previous, EMPTY_SHA256, hashlib.sha256(data).hexdigest()]
        )
        if not hmac.compare_digest(_hex_hmac(key, string_to_sign), signature):
            raise AuthFailure(403, "InvalidSignatureException", "aws-chunked body: chunk signature does not match")
        previous = signature
        payload += data
        pos = end + 4 + size
        if size == 0:
            if pos != len(body):
                raise AuthFailure(400, "IncompleteSignatureException", "aws-chunked body: data after the final chunk")
            return bytes(payload)
