"""A small synchronous SigV4 client for tests that call the emulator's DICOMweb host
directly (the DICOMweb operations are not in botocore's model). It signs with
botocore's SigV4Auth, so the emulator's own verifier is the independent side."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class SignedClient:
    """Requests to ``url`` (query already encoded as it must go on the wire)."""

    access_key: str
    secret_key: str
    region: str = "us-east-1"
    session_token: str | None = None

    def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Reply:
        headers = dict(headers or {})
        headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        aws = AWSRequest(method=method, url=url, headers=headers, data=body)
        SigV4Auth(Credentials(self.access_key, self.secret_key, self.session_token), "medical-imaging", self.region).add_auth(aws)
        req = urllib.request.Request(url, data=body or None, method=method, headers=dict(aws.headers.items()))
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())

    def get(self, url: str, accept: str = "application/dicom+json") -> Reply:
        return self.request("GET", url, {"Accept": accept})
