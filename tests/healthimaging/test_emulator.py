"""The HealthImaging emulator itself: that real clients (botocore's own ``medical-imaging``
client, curl's ``--aws-sigv4`` running the vendor's documented commands) are accepted
with the right keys and refused as AWS refuses them otherwise, and that it serves
what the developer guide documents."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import botocore.session
import imagecodecs
import numpy as np
import pydicom
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

import gateway.codecs  # noqa: F401 - registers the HTJ2K decoder with pydicom
from tests.support.healthimaging import Emulator, session_credentials
from tests.support.healthimaging.client import SignedClient
from tests.support.synth import ct_series

SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "samples"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
ELE = "1.2.840.10008.1.2.1"
CURL = shutil.which("curl")


def runtime_client(emulator: Emulator, key: str, secret: str, token: str | None = None, **config: object):
    return botocore.session.get_session().create_client(
        "medical-imaging",
        region_name=emulator.region,
        endpoint_url=emulator.runtime_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(inject_host_prefix=False, retries={"total_max_attempts": 1}, **config),
    )


def stow(client: SignedClient, emulator: Emulator, paths: list[Path], study: str | None = None) -> dict:
    boundary = "emulator-test-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in paths)
    body += f"--{boundary}--\r\n".encode()
    url = f"{emulator.datastore_url}/studies" + (f"/{study}" if study else "")
    reply = client.request(
        "POST", url,
        {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"},
        body,
    )
    assert reply.status == 200, reply.body
    return json.loads(reply.body)


@pytest.fixture
def keys(emulator: Emulator) -> tuple[str, str]:
    return emulator.add_key()


@pytest.fixture
def client(emulator: Emulator, keys: tuple[str, str]) -> SignedClient:
    return SignedClient(*keys, region=emulator.region)


def test_botocore_client_is_served_with_the_right_keys_and_refused_with_a_wrong_secret(
    emulator: Emulator, keys: tuple[str, str], client: SignedClient, tmp_path: Path
) -> None:
    (path,) = ct_series(tmp_path, 1, rows=64, columns=64)
    original = pydicom.dcmread(path)
    stow(client, emulator, [path])
    native = runtime_client(emulator, *keys)
    ds_id = emulator.datastore.id

    found = native.search_image_sets(
        datastoreId=ds_id,
        searchCriteria={"filters": [{"values": [{"DICOMStudyInstanceUID": original.StudyInstanceUID}], "operator": "EQUAL"}]},
    )["imageSetsMetadataSummaries"]
    assert len(found) == 1 and found[0]["isPrimary"] is True
    assert found[0]["DICOMTags"]["DICOMPatientId"] == "SYNTH-001"
    image_set_id = found[0]["imageSetId"]
    assert native.get_image_set(datastoreId=ds_id, imageSetId=image_set_id)["versionId"] == "1"
    assert native.list_image_set_versions(datastoreId=ds_id, imageSetId=image_set_id)["imageSetPropertiesList"][0]["versionId"] == "1"

    answer = native.get_image_set_metadata(datastoreId=ds_id, imageSetId=image_set_id)
    assert answer["contentEncoding"] == "gzip"
    document = json.loads(gzip.decompress(answer["imageSetMetadataBlob"].read()))
    assert document["ImageSetID"] == image_set_id and document["Patient"]["DICOM"]["PatientID"] == "SYNTH-001"
    stored = document["Study"]["Series"][original.SeriesInstanceUID]["Instances"][original.SOPInstanceUID]
    assert stored["StoredTransferSyntaxUID"] == HTJ2K_RPCL
    frame = native.get_image_frame(
        datastoreId=ds_id, imageSetId=image_set_id, imageFrameInformation={"imageFrameId": stored["ImageFrames"][0]["ID"]}
    )
    assert frame["contentType"] == "image/jph"
    assert np.array_equal(imagecodecs.htj2k_decode(frame["imageFrameBlob"].read()), original.pixel_array)

    wrong = runtime_client(emulator, keys[0], keys[1] + "x")
    with pytest.raises(ClientError) as refused:
        wrong.get_image_set(datastoreId=ds_id, imageSetId=image_set_id)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_refusals_name_what_is_wrong_as_aws_does(emulator: Emulator, keys: tuple[str, str]) -> None:
    def code(client) -> str:  # type: ignore[no-untyped-def]
        with pytest.raises(ClientError) as refused:
            client.search_image_sets(datastoreId=emulator.datastore.id)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        return refused.value.response["Error"]["Code"]

    assert code(runtime_client(emulator, "AKIAUNKNOWN000000000", "secret")) == "UnrecognizedClientException"
    fresh = session_credentials(emulator.identities.master, ttl=60)
    session = runtime_client(emulator, fresh["AccessKeyId"], fresh["SecretAccessKey"], fresh["SessionToken"])
    assert "imageSetsMetadataSummaries" in session.search_image_sets(datastoreId=emulator.datastore.id)
    assert code(runtime_client(emulator, fresh["AccessKeyId"], fresh["SecretAccessKey"], fresh["SessionToken"] + "0")) == "UnrecognizedClientException"
    stale = session_credentials(emulator.identities.master, ttl=-1)
    assert code(runtime_client(emulator, stale["AccessKeyId"], stale["SecretAccessKey"], stale["SessionToken"])) == "ExpiredTokenException"
    emulator.clock_offset = 360.0  # our clock six minutes behind the service's
    assert code(runtime_client(emulator, *keys)) == "InvalidSignatureException"
    assert emulator.requests[-1].message.startswith("Signature expired")


@pytest.mark.skipif(CURL is None, reason="no curl on this machine")
def test_the_vendors_curl_commands_are_accepted(emulator: Emulator, keys: tuple[str, str], tmp_path: Path) -> None:
    """Seeds 001 (StoreDICOM, StoreDICOMStudy, the hand-built multipart) and 000
    (GetDICOMInstanceFrames), host changed, run by curl's own SigV4 signer."""
    key, secret = keys
    common = ["--aws-sigv4", f"aws:amz:{emulator.region}:medical-imaging", "--user", f"{key}:{secret}", "--header", "x-amz-security-token:"]

    def curl(*args: str) -> tuple[int, bytes]:
        done = subprocess.run([CURL, "-sS", *args, *common, "-o", str(tmp_path / "out"), "-w", "%{http_code}"], capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return int(done.stdout), (tmp_path / "out").read_bytes()

    first, second, third = sorted(SAMPLES.glob("*.dcm"))
    streaming = ["--header", "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "--header", "Accept: application/dicom+json"]
    status, body = curl(
        "-X", "POST", f"{emulator.datastore_url}/studies", *streaming,
        "--header", f"x-amz-decoded-content-length: {first.stat().st_size}", "--header", "Content-Type: application/dicom",
        "--upload-file", str(first),
    )
    assert status == 200 and "00081199" in json.loads(body)
    study = str(pydicom.dcmread(second, stop_before_pixels=True).StudyInstanceUID)
    status, body = curl(
        "-X", "POST", f"{emulator.datastore_url}/studies/{study}", *streaming,
        "--header", f"x-amz-decoded-content-length: {second.stat().st_size}", "--header", "Content-Type: application/dicom",
        "--upload-file", str(second),
    )
    assert status == 200 and "00081199" in json.loads(body)
    # Example 3 builds its payload with printf '%b' and cat; the same bytes here.
    boundary = "2a8a02b9-0ed3-c8a7-7ebd-232427531940"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    payload = tmp_path / "multipart.payload"
    payload.write_bytes(head + first.read_bytes() + b"\r\n" + head + third.read_bytes() + f"\r\n--{boundary}--".encode())
    status, body = curl(
        "-X", "POST", f"{emulator.datastore_url}/studies", *streaming,
        "--header", f"x-amz-decoded-content-length: {payload.stat().st_size}",
        "--header", f'Content-Type: multipart/related; type="application/dicom"; boundary="{boundary}"',
        "--data-binary", f"@{payload}",
    )
    assert status == 200 and len(json.loads(body)["00081199"]["Value"]) == 2

    ds = pydicom.dcmread(third)
    image_set = emulator.instance(str(ds.SOPInstanceUID)).image_set_id  # type: ignore[union-attr]
    status, body = curl(
        "--request", "GET",
        f"{emulator.datastore_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1?imageSetId={image_set}",
        "--header", f"Accept: multipart/related; type=application/octet-stream; transfer-syntax={ELE}",
    )
    assert status == 200
    assert ds.pixel_array.tobytes() in body
    assert not emulator.refusals()


def test_an_aws_chunked_body_is_verified_chunk_by_chunk(emulator: Emulator, keys: tuple[str, str], tmp_path: Path) -> None:
    (path,) = ct_series(tmp_path, 1, rows=64, columns=64)
    data = path.read_bytes()
    url = f"{emulator.datastore_url}/studies"

    def send(tamper: bool) -> int:
        aws = AWSRequest(method="POST", url=url, headers={
            "Content-Type": "application/dicom", "Content-Encoding": "aws-chunked",
            "X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "x-amz-decoded-content-length": str(len(data)),
        })
        SigV4Auth(Credentials(*keys), "medical-imaging", emulator.region).add_auth(aws)
        stamp = aws.headers["X-Amz-Date"]
        scope = f"{stamp[:8]}/{emulator.region}/medical-imaging/aws4_request"
        key = ("AWS4" + keys[1]).encode()
        for part in (stamp[:8], emulator.region, "medical-imaging", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        previous = aws.headers["Authorization"].rsplit("Signature=", 1)[1]
        body = b""
        for chunk in (data[:4096], data[4096:], b""):
            sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", stamp, scope, previous, hashlib.sha256(b"").hexdigest(), hashlib.sha256(chunk).hexdigest()])
            previous = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
            sent = chunk[:-1] + b"\x00" if tamper and chunk else chunk
            body += f"{len(chunk):x};chunk-signature={previous}\r\n".encode() + sent + b"\r\n"
        return post_raw(url, dict(aws.headers.items()), body)

    assert send(tamper=True) == 403
    assert send(tamper=False) == 200
    assert emulator.instance(str(pydicom.dcmread(path).SOPInstanceUID)) is not None


def post_raw(url: str, headers: dict[str, str], body: bytes) -> int:
    """POST already-signed headers and a body as they are; the status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST", headers=headers), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_operations_over_their_quota_are_throttled(keys: tuple[str, str]) -> None:
    with Emulator(quota_scale=0.04) as emulator:  # SearchImageSets: 1 request/s, burst 2
        emulator.identities.add(*keys)
        native = runtime_client(emulator, *keys)
        codes = []
        for _ in range(3):
            try:
                native.search_image_sets(datastoreId=emulator.datastore.id)
                codes.append(200)
            except ClientError as exc:
                codes.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])
                assert exc.response["Error"]["Code"] == "ThrottlingException"
        assert codes == [200, 200, 429]


def test_qido_limits_and_documented_keys(emulator: Emulator, client: SignedClient, tmp_path: Path) -> None:
    paths = ct_series(tmp_path, 3, rows=16, columns=16)
    stow(client, emulator, paths)
    ds = pydicom.dcmread(paths[0])
    studies = f"{emulator.datastore_url}/studies"
    assert client.get(f"{studies}?limit=1001").status == 400
    assert client.get(f"{studies}?offset=10000").status == 400
    assert client.get(f"{studies}?PatientSex=F").status == 400  # not a documented study key
    found = json.loads(client.get(f"{studies}?PatientName=Synth%2A&00100020=SYNTH-001").body)
    assert [s["0020000D"]["Value"] for s in found] == [[ds.StudyInstanceUID]]
    instances = f"{studies}/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances"
    pages = [json.loads(client.get(f"{instances}?limit=2&offset={o}").body) for o in (0, 2)]
    assert [len(p) for p in pages] == [2, 1]
    assert [i["00200013"]["Value"][0] for i in pages[0] + pages[1]] == [1, 2, 3]


def test_conflicting_instances_go_to_a_non_primary_image_set(
    emulator: Emulator, keys: tuple[str, str], client: SignedClient, tmp_path: Path
) -> None:
    first, second = ct_series(tmp_path, 2, rows=16, columns=16)
    ds = pydicom.dcmread(second)
    ds.PatientID = "OTHER-ID"
    ds.save_as(second)
    stow(client, emulator, [first, second])
    sets = emulator.image_sets()
    assert sorted(s.primary for s in sets) == [False, True]
    non_primary = next(s for s in sets if not s.primary)
    listed = json.loads(client.get(f"{emulator.datastore_url}/studies/{ds.StudyInstanceUID}/instances").body)
    assert [i["00080018"]["Value"][0] for i in listed] == [str(pydicom.dcmread(first).SOPInstanceUID)]
    url = f"{emulator.datastore_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert client.get(url, accept="application/dicom; transfer-syntax=*").status == 404
    assert client.get(f"{url}?imageSetId={non_primary.id}", accept="application/dicom; transfer-syntax=*").status == 200
    found = runtime_client(emulator, *keys).search_image_sets(
        datastoreId=emulator.datastore.id, searchCriteria={"filters": [{"values": [{"isPrimary": False}], "operator": "EQUAL"}]}
    )["imageSetsMetadataSummaries"]
    assert [s["imageSetId"] for s in found] == [non_primary.id]


def test_wado_serves_the_stored_htj2k_or_decoded_pixels_and_no_bulk_retrieve(
    emulator: Emulator, client: SignedClient, tmp_path: Path
) -> None:
    (path,) = ct_series(tmp_path, 1, rows=32, columns=32, frames=2)
    original = pydicom.dcmread(path)
    stow(client, emulator, [path])
    study, series, sop = original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    url = f"{emulator.datastore_url}/studies/{study}/series/{series}/instances/{sop}"

    stored = client.get(url, accept="application/dicom; transfer-syntax=*")
    assert stored.status == 200 and stored.headers["content-type"].endswith(f"transfer-syntax={HTJ2K_RPCL}")
    as_stored = pydicom.dcmread(io.BytesIO(stored.body))
    assert as_stored.file_meta.TransferSyntaxUID == HTJ2K_RPCL
    assert np.array_equal(as_stored.pixel_array, original.pixel_array)
    decoded = client.get(url, accept=f"application/dicom; transfer-syntax={ELE}")
    assert pydicom.dcmread(io.BytesIO(decoded.body)).PixelData == original.PixelData
    assert client.get(url, accept="application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50").status == 406
    frames = client.get(f"{url}/frames/2", accept=f"multipart/related; type=application/octet-stream; transfer-syntax={ELE}")
    assert frames.status == 200 and original.PixelData[32 * 32 * 2 :] in frames.body
    assert client.get(f"{url}/frames/3", accept="multipart/related; type=application/octet-stream").status == 400
    for bulk in (f"{emulator.datastore_url}/studies/{study}", f"{emulator.datastore_url}/studies/{study}/series/{series}"):
        reply = client.get(bulk, accept='multipart/related; type="application/dicom"')
        assert reply.status == 404 and reply.headers["x-amzn-errortype"] == "UnknownOperationException"
    metadata = json.loads(client.get(f"{emulator.datastore_url}/studies/{study}/series/{series}/metadata").body)
    assert metadata[0]["00020010"]["Value"] == [HTJ2K_RPCL]


def test_payload_hash_forms(emulator: Emulator, keys: tuple[str, str], tmp_path: Path) -> None:
    """UNSIGNED-PAYLOAD is accepted as the literal; a declared hash that is not the
    body's makes the signature fail, as the service hashes what it received."""
    (path,) = ct_series(tmp_path, 1, rows=8, columns=8)
    data = path.read_bytes()
    url = f"{emulator.datastore_url}/studies"

    def post(declared: str, body: bytes) -> int:
        aws = AWSRequest(method="POST", url=url, headers={"Content-Type": "application/dicom", "X-Amz-Content-SHA256": declared})
        SigV4Auth(Credentials(*keys), "medical-imaging", emulator.region).add_auth(aws)
        return post_raw(url, dict(aws.headers.items()), body)

    assert post(hashlib.sha256(data).hexdigest(), data[:-1] + b"\x01") == 403
    assert post("UNSIGNED-PAYLOAD", data) == 200
    assert post(hashlib.sha256(data).hexdigest(), data) == 200
