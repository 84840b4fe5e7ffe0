"""The native image-set operations on the ``runtime-`` host, as botocore's
``medical-imaging`` model (2023-07-19) defines them: REST paths, JSON shapes, errors.

SearchImageSets filters with EQUAL on patient ID, accession number, study ID, study
and series UIDs and ``isPrimary``, and BETWEEN on ``createdAt``, ``updatedAt`` and
``DICOMStudyDateAndTime``; at most two filters of one or two values (the model's
bounds); sorted by ``updatedAt`` descending unless asked otherwise; pages of
``maxResults`` (at most 50, default 50) with an opaque ``nextToken`` and no cap on
how far paging goes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from typing import Any

from tests.support.healthimaging.store import Datastore, ImageSet

MAX_RESULTS = 50
EQUAL_FIELDS = {
    "DICOMPatientId": "PatientID",
    "DICOMAccessionNumber": "AccessionNumber",
    "DICOMStudyId": "StudyID",
    "DICOMStudyInstanceUID": "StudyInstanceUID",
    "DICOMSeriesInstanceUID": "SeriesInstanceUID",
    "isPrimary": "",
}
BETWEEN_FIELDS = ("createdAt", "updatedAt", "DICOMStudyDateAndTime")
SORT_FIELDS = ("updatedAt", "createdAt", "DICOMStudyDateAndTime")


class ApiError(Exception):
    """An error of the rest-json protocol: status, x-amzn-ErrorType, message."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def validation(message: str) -> ApiError:
    return ApiError(400, "ValidationException", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "ResourceNotFoundException", message)


def _timestamp(value: Any) -> float:
    """A model ``timestamp`` as botocore sends it (epoch seconds) or as ISO 8601."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    raise validation(f"not a timestamp: {value!r}")


def _study_datetime(image_set: ImageSet) -> str:
    return image_set.attributes.get("StudyDate", "") + (image_set.attributes.get("StudyTime", "") or "000000")


def _series_uids(image_set: ImageSet) -> set[str]:
    return {i.series_uid for i in image_set.instances.values()}


def _equal(image_set: ImageSet, field: str, value: Any) -> bool:
    if field == "isPrimary":
        if not isinstance(value, bool):
            raise validation("isPrimary must be a boolean")
        return image_set.primary is value
    if field == "DICOMSeriesInstanceUID":
        return value in _series_uids(image_set)
    if field == "DICOMStudyInstanceUID":
        return image_set.study_uid == value
    return image_set.attributes.get(EQUAL_FIELDS[field], "") == value


def _between_key(field: str, value: Any) -> Any:
    if field == "DICOMStudyDateAndTime":
        if not isinstance(value, dict) or "DICOMStudyDate" not in value:
            raise validation("DICOMStudyDateAndTime needs DICOMStudyDate")
        return str(value["DICOMStudyDate"]) + (str(value.get("DICOMStudyTime") or "") or "000000")
    return _timestamp(value)


def _field_of(image_set: ImageSet, field: str) -> Any:
    if field == "DICOMStudyDateAndTime":
        return _study_datetime(image_set)
    return image_set.created_at if field == "createdAt" else image_set.updated_at


def _predicate(flt: Any) -> Any:
    if not isinstance(flt, dict) or flt.get("operator") not in ("EQUAL", "BETWEEN"):
        raise validation("each filter needs an operator, EQUAL or BETWEEN")
    values = flt.get("values")
    if not isinstance(values, list) or not 1 <= len(values) <= 2 or not all(isinstance(v, dict) and len(v) == 1 for v in values):
        raise validation("each filter needs one or two values, each naming one attribute")
    fields = {next(iter(v)) for v in values}
    if len(fields) != 1:
        raise validation("the values of a filter must name the same attribute")
    field = fields.pop()
    if flt["operator"] == "EQUAL":
        if field not in EQUAL_FIELDS or len(values) != 1:
            raise validation(f"EQUAL takes one value of {', '.join(EQUAL_FIELDS)}, got {field}")
        wanted = values[0][field]
        return lambda s: _equal(s, field, wanted)
    if field not in BETWEEN_FIELDS or len(values) != 2:
        raise validation(f"BETWEEN takes two values of {', '.join(BETWEEN_FIELDS)}, got {field}")
    low, high = (_between_key(field, v[field]) for v in values)
    return lambda s: low <= _field_of(s, field) <= high


def summary(image_set: ImageSet) -> dict[str, Any]:
    """One entry of imageSetsMetadataSummaries."""
    a = image_set.attributes
    tags: dict[str, Any] = {
        "DICOMPatientId": a.get("PatientID", ""),
        "DICOMPatientName": a.get("PatientName", ""),
        "DICOMPatientBirthDate": a.get("PatientBirthDate", ""),
        "DICOMPatientSex": a.get("PatientSex", ""),
        "DICOMStudyInstanceUID": image_set.study_uid,
        "DICOMStudyId": a.get("StudyID", ""),
        "DICOMStudyDescription": a.get("StudyDescription", ""),
        "DICOMNumberOfStudyRelatedSeries": len(_series_uids(image_set)),
        "DICOMNumberOfStudyRelatedInstances": len(image_set.instances),
        "DICOMAccessionNumber": a.get("AccessionNumber", ""),
        "DICOMStudyDate": a.get("StudyDate", ""),
        "DICOMStudyTime": a.get("StudyTime", ""),
    }
    return {
        "imageSetId": image_set.id,
        "version": image_set.version,
        "createdAt": image_set.created_at,
        "updatedAt": image_set.updated_at,
        "DICOMTags": tags,
        "isPrimary": image_set.primary,
    }


def _token(offset: int, fingerprint: str) -> str:
    return base64.b64encode(json.dumps({"o": offset, "f": fingerprint}).encode()).decode("ascii")


def _offset(token: str | None, fingerprint: str) -> int:
    if not token:
        return 0
    try:
        state = json.loads(base64.b64decode(token))
        if state["f"] == fingerprint and isinstance(state["o"], int):
            return state["o"]
    except (ValueError, KeyError, TypeError):
        pass
    raise validation("invalid nextToken")


def _page_size(raw: str | None) -> int:
    if raw is None:
        return MAX_RESULTS
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_RESULTS:
        raise validation(f"maxResults must be from 1 to {MAX_RESULTS}")
    return int(raw)


def search_image_sets(store: Datastore, criteria: Any, max_results: str | None, next_token: str | None) -> dict[str, Any]:
    criteria = criteria or {}
    if not isinstance(criteria, dict):
        raise validation("searchCriteria must be an object")
    filters = criteria.get("filters") or []
    if not isinstance(filters, list) or len(filters) > 2:
        raise validation("at most 2 filters")
    predicates = [_predicate(f) for f in filters]
    sort = criteria.get("sort") or {"sortField": "updatedAt", "sortOrder": "DESC"}
    if sort.get("sortField") not in SORT_FIELDS or sort.get("sortOrder") not in ("ASC", "DESC"):
        raise validation("sort needs sortField (updatedAt, createdAt, DICOMStudyDateAndTime) and sortOrder (ASC, DESC)")
    fingerprint = hashlib.sha256(json.dumps(criteria, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def matching() -> list[ImageSet]:
        with store.lock:
            found = [s for s in store.image_sets.values() if s.instances and all(p(s) for p in predicates)]
        found.sort(key=lambda s: (_field_of(s, sort["sortField"]), s.id), reverse=sort["sortOrder"] == "DESC")
        return found

    found = store.remembered(("SearchImageSets", fingerprint), matching)
    size = _page_size(max_results)
    start = _offset(next_token, fingerprint)
    chosen = found[start : start + size]
    answer: dict[str, Any] = {"imageSetsMetadataSummaries": [summary(s) for s in chosen], "sort": sort}
    if start + size < len(found):
        answer["nextToken"] = _token(start + size, fingerprint)
    return answer


def image_set(store: Datastore, image_set_id: str) -> ImageSet:
    with store.lock:
        found = store.image_sets.get(image_set_id)
    if found is None:
        raise not_found(f"Image set {image_set_id} does not exist")
    return found


def version_of(found: ImageSet, raw: str | None) -> int:
    if raw is None:
        return found.version
    if not raw.isdigit() or not 1 <= int(raw) <= found.version:
        raise not_found(f"Version {raw} of image set {found.id} does not exist")
    return int(raw)


def properties(store: Datastore, found: ImageSet, version: int, region: str) -> dict[str, Any]:
    """GetImageSet's answer for one version."""
    _, updated, status = next(h for h in found.history if h[0] == version)
    return {
        "datastoreId": store.id,
        "imageSetId": found.id,
        "versionId": str(version),
        "imageSetState": "ACTIVE",
        "imageSetWorkflowStatus": status,
        "createdAt": found.created_at,
        "updatedAt": updated,
        "imageSetArn": f"arn:aws:medical-imaging:{region}:123456789012:datastore/{store.id}/imageset/{found.id}",
        "isPrimary": found.primary,
    }


def versions(found: ImageSet, max_results: str | None, next_token: str | None) -> dict[str, Any]:
    history = sorted(found.history, reverse=True)
    size = _page_size(max_results)
    start = _offset(next_token, found.id)
    entries = [
        {
            "imageSetId": found.id,
            "versionId": str(version),
            "imageSetState": "ACTIVE",
            "ImageSetWorkflowStatus": status,
            "createdAt": found.created_at,
            "updatedAt": updated,
            "isPrimary": found.primary,
        }
        for version, updated, status in history[start : start + size]
    ]
    answer: dict[str, Any] = {"imageSetPropertiesList": entries}
    if start + size < len(history):
        answer["nextToken"] = _token(start + size, found.id)
    return answer
