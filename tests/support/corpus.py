"""The DICOM test corpus: the shared samples plus pydicom's bundled test files.

pydicom's ``data/test_files`` is the widest set of encodings available offline
(implicit/explicit/big endian, deflate, RLE, JPEG baseline/extended/lossless,
JPEG-LS lossless/near-lossless, JPEG 2000 lossless/lossy) and of structures
(nested and private sequences, multi-frame, odd lengths, trailing padding).
:func:`pydicom_corpus` keeps the files a C-STORE SCU can send as they are:
a DICOM file with file meta, a transfer syntax, a SOP Class and SOP Instance
UID, and no truncated element.

Excluded from the pydicom 3.0.2 set, and why:

* not DICOM files: ``README.txt``, ``*.dump``, ``*.json``, ``crayons.icc``,
  ``zipMR.gz`` (gzipped), ``dicomdirtests/**/README*``;
* no file meta / no ``DICM`` prefix, so no transfer syntax to send them in:
  ``no_meta.dcm``, ``ExplVR_BigEndNoMeta.dcm``, ``ExplVR_LitEndNoMeta.dcm``,
  ``rtstruct.dcm``;
* file meta without TransferSyntaxUID: ``meta_missing_tsyntax.dcm``;
* no SOP Class / SOP Instance UID, i.e. fragments for parser tests, not
  storable instances: ``UN_sequence.dcm``, ``empty_charset_LEI.dcm``,
  ``nested_priv_SQ.dcm``, ``priv_SQ.dcm``, ``no_meta_group_length.dcm`` and
  every ``DICOMDIR*`` (Media Storage Directory objects are not sent over
  C-STORE);
* data set encoded differently from what its TransferSyntaxUID says:
  ``SC_rgb_jpeg.dcm`` (implicit VR under JPEG Baseline; dcmtk cannot parse
  it);
* deliberately truncated (an element's declared length runs past the end of
  the file; dcmtk refuses to read them): ``MR_truncated.dcm``,
  ``rtplan_truncated.dcm``.

What remains: 146 files in 12 transfer syntaxes (Implicit/Explicit VR Little
Endian, Explicit VR Big Endian, Deflated, RLE, JPEG Baseline, JPEG Extended,
JPEG Lossless SV1, JPEG-LS lossless and near-lossless, JPEG 2000 lossless and
lossy) and 120 distinct SOP Instance UIDs. Two of them, ``rtdose_rle.dcm`` and
``rtdose_rle_1frame.dcm``, encode every element with VR UN; dcmtk 3.6.7's
storescu refuses them ("No SOP Class or Instance UID in file") so
:func:`pydicom_corpus` leaves them out by default (144 items), while
pynetdicom (:mod:`tests.support.pyscu`) sends them and storescp and Orthanc
store them. For the other 144, checked against dcmtk 3.6.7 and Orthanc 1.10:
storescu sends every file when a profile from
:func:`tests.support.dcmtk.storescu_for_syntax` proposes the file's own
transfer syntax, and storescp (``+B``), Orthanc's stored file and its WADO-RS
answer all hold data sets equal to the originals under
:func:`tests.support.compare.assert_same_dataset`. ``badVR.dcm`` (an
over-long UI value) and ``JPEG2000-embedded-sequence-delimiter.dcm`` (a
delimiter tag inside a fragment) are kept on purpose: they are valid enough
to send and are exactly the kind of input a gateway must pass through
untouched.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import config, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES_DIR = REPO_ROOT.parent / "shared" / "samples"
PYDICOM_TEST_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"

_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class CorpusItem:
    """One sendable file and the identifiers tests assert on.

    ``study_uid``/``series_uid`` are ``""`` for the few pydicom files that lack
    them (JPEG-LS near-lossless samples); :func:`unique_by_sop_instance` gives
    those fresh ones. ``dcmtk_sendable`` is False when the SOP Class/Instance
    UIDs are encoded with VR UN: dcmtk's storescu then finds "No SOP Class or
    Instance UID in file" and refuses it (pynetdicom sends it fine).
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_uid: str
    series_uid: str
    dcmtk_sendable: bool = True


def _truncated_element(ds: Dataset) -> str | None:
    """Name the first element whose value is shorter than its declared length.

    pydicom reads truncated files without complaint; dcmtk does not, so such
    files cannot be sent and must not be in the corpus.
    """
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH and raw.value is not None:
            if len(raw.value) != raw.length:
                return f"{tag} declares {raw.length} bytes, file has {len(raw.value)}"
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                problem = _truncated_element(item)
                if problem:
                    return problem
    return None


def _read_as_implicit(ds: Dataset) -> bool:
    """Whether pydicom had to read the data set as implicit VR.

    pydicom silently falls back to implicit VR when an "explicit" file is not;
    its raw elements then carry no VR.
    """
    first = ds.get_item(next(iter(ds.keys())))
    return isinstance(first, RawDataElement) and first.VR is None


def read_item(path: Path) -> CorpusItem:
    """Read one file into a CorpusItem; ValueError says why it is not sendable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path)
        except (InvalidDicomError, EOFError, OSError) as exc:
            raise ValueError(f"not a DICOM file with file meta: {exc}") from exc
        # Checked before anything reads these elements: reading converts UN.
        uids_as_un = any(
            isinstance(ds.get_item(k), RawDataElement) and ds.get_item(k).VR == "UN"
            for k in ("SOPClassUID", "SOPInstanceUID")
            if k in ds
        )
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if not syntax:
            raise ValueError("no TransferSyntaxUID in file meta")
        sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
        if not sop_class or not sop_instance:
            raise ValueError("no SOPClassUID/SOPInstanceUID")
        if _read_as_implicit(ds) != syntax.is_implicit_VR:
            raise ValueError(f"data set VR encoding does not match its transfer syntax {syntax.name}")
        problem = _truncated_element(ds)
        if problem:
            raise ValueError(f"truncated: {problem}")
    return CorpusItem(
        path=path,
        sop_class_uid=str(sop_class),
        sop_instance_uid=str(sop_instance),
        transfer_syntax_uid=str(syntax),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        dcmtk_sendable=not uids_as_un,
    )


def sample_files() -> list[Path]:
    """The three project samples in ``shared/samples`` (explicit VR LE, RGB)."""
    files = sorted(SAMPLES_DIR.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no samples in {SAMPLES_DIR}")
    return files


def sample_items() -> list[CorpusItem]:
    """:func:`sample_files` as CorpusItems."""
    return [read_item(path) for path in sample_files()]


def scan(root: Path) -> tuple[list[CorpusItem], dict[Path, str]]:
    """Read every file under ``root``: (sendable items, {excluded path: reason})."""
    items: list[CorpusItem] = []
    excluded: dict[Path, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            items.append(read_item(path))
        except ValueError as exc:
            excluded[path] = str(exc)
    return items, excluded


def pydicom_corpus(dcmtk_only: bool = True) -> list[CorpusItem]:
    """Every sendable file bundled with pydicom, sorted by path.

    With ``dcmtk_only`` (the default) the files dcmtk's storescu refuses are
    left out (see :attr:`CorpusItem.dcmtk_sendable`).

    Several are the same instance in different encodings (e.g. the MR_small_*
    family shares one SOP Instance UID): pass the result through
    :func:`unique_by_sop_instance` before sending it to an archive.
    """
    items = scan(PYDICOM_TEST_FILES)[0]
    return [item for item in items if item.dcmtk_sendable or not dcmtk_only]


def unique_by_sop_instance(items: Iterable[CorpusItem], out_dir: Path) -> list[CorpusItem]:
    """Copy every item under fresh UIDs into ``out_dir`` so all UIDs are unique.

    An archive keeps one instance per SOP Instance UID, so sending the
    MR_small_* family as is would leave one survivor and hide which encodings
    were stored. Each copy gets a new SOPInstanceUID (and matching
    MediaStorageSOPInstanceUID); Study and Series Instance UIDs are mapped
    consistently (files that shared a study still do) and added where missing.
    Everything else keeps its encoding: the transfer syntax is unchanged and
    pydicom writes the other elements, encapsulated pixel data included, from
    the bytes it read. Data set group lengths are removed because the new UIDs
    would make them wrong; they are retired and ignored by every comparison.
    Fresh UIDs on each call also keep a shared (session) archive free of
    collisions between tests.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # Files such as rtdose_rle.dcm encode every element as UN; pydicom would
    # otherwise turn the ones it touches into their dictionary VR on write.
    replace_un, config.replace_un_with_known_vr = config.replace_un_with_known_vr, False
    try:
        return _reparent(items, out_dir)
    finally:
        config.replace_un_with_known_vr = replace_un


def _set_uid(ds: Dataset, keyword: str, uid: str) -> None:
    """Set a UID element, keeping UN encoding where the original used it."""
    tag = tag_for_keyword(keyword)
    existing = ds.get_item(tag) if tag in ds else None
    if existing is not None and existing.VR == "UN":
        value = uid.encode("ascii")
        ds[tag] = DataElement(tag, "UN", value + b"\0" * (len(value) % 2))
    else:
        setattr(ds, keyword, uid)


def _reparent(items: Iterable[CorpusItem], out_dir: Path) -> list[CorpusItem]:
    studies: defaultdict[str, str] = defaultdict(lambda: str(generate_uid()))
    series: defaultdict[str, str] = defaultdict(lambda: str(generate_uid()))
    copies: list[CorpusItem] = []
    for index, item in enumerate(items):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(item.path)
            study_uid = studies[item.study_uid or f"missing-study-{item.path}"]
            series_uid = series[item.series_uid or f"missing-series-{item.path}"]
            sop_uid = str(generate_uid())
            for tag in [t for t in ds.keys() if t.element == 0]:
                del ds[tag]
            _set_uid(ds, "StudyInstanceUID", study_uid)
            _set_uid(ds, "SeriesInstanceUID", series_uid)
            _set_uid(ds, "SOPInstanceUID", sop_uid)
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            target = out_dir / f"{index:04d}_{item.path.name}"
            if not target.name.endswith(".dcm"):
                target = target.with_name(target.name + ".dcm")
            ds.save_as(target, enforce_file_format=True)
        copies.append(
            CorpusItem(
                path=target,
                sop_class_uid=item.sop_class_uid,
                sop_instance_uid=sop_uid,
                transfer_syntax_uid=item.transfer_syntax_uid,
                study_uid=study_uid,
                series_uid=series_uid,
                dcmtk_sendable=item.dcmtk_sendable,
            )
        )
    return copies


def group_by_transfer_syntax(items: Iterable[CorpusItem]) -> dict[str, list[CorpusItem]]:
    """Items per transfer syntax UID, in a stable order.

    storescu proposes one transfer syntax per SOP class per association, so a
    test sends each group with its own storescu run and
    ``storescu_for_syntax(syntax, {i.sop_class_uid for i in group})``.
    """
    groups: dict[str, list[CorpusItem]] = {}
    for item in sorted(items, key=lambda i: (i.transfer_syntax_uid, str(i.path))):
        groups.setdefault(item.transfer_syntax_uid, []).append(item)
    return groups
