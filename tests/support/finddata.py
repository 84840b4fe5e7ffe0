"""A synthetic archive for C-FIND conformance tests: many patients, studies and dates.

Generated, deterministic (seeded) and small: each instance is an 8x8 image, so 300+
studies fit in a few megabytes. What it contains, and why:

* patients whose names exercise Person Name matching: carets with empty components,
  spaces inside components, apostrophes, Latin-1 letters (stored as ISO_IR 100),
  non-Latin-1 letters (stored as ISO_IR 192 / UTF-8) and Japanese names with
  ideographic and phonetic groups (stored as ISO 2022 IR 87);
* several studies per patient on dates spread over ten years, with times, so date,
  time and combined date-time ranges select real subsets;
* two or three series per study with different modalities (ModalitiesInStudy is
  multi-valued), one or two instances per series;
* a sequence at study level (ProcedureCodeSequence) for sequence matching.

Every value is a plain function of the seed, so a test may compute expected answers
from :class:`Archive` instead of hard-coding them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

#: Root under which all UIDs of the synthetic archive are made (deterministic, unique).
UID_ROOT = "1.2.826.0.1.3680043.10.1137."

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}

# (name, character set); names chosen to exercise matching, not to look realistic.
ASCII_NAMES = [
    "DOE^JOHN", "DOE^JANE", "DOE^JOHN^A^DR^JR", "SMITH^ANNA^MARIE", "SMITH^ANNE",
    "VAN DER BERG^PIETER", "VAN DAM^ELS", "O'NEIL^SEAN", "MC DONALD^RONALD",
    "BROWN^", "^MADONNA", "LEE^SOO MIN", "NGUYEN^VAN AN", "GARCIA LOPEZ^MARIA JOSE",
    "JOHNSON^ROBERT^^MR", "WILLIAMS^MARY", "TAYLOR^CHRIS", "ANDERSON^KIM",
    "THOMAS^PAUL", "JACKSON^LEE", "WHITE^BARRY", "HARRIS^EMMA", "MARTIN^LUKE",
    "THOMPSON^ZOE", "YOUNG^NEIL", "KING^STEPHEN", "WRIGHT^ORVILLE", "HILL^BENNY",
    "SCOTT^DANA", "GREEN^AL",
]
LATIN1_NAMES = [
    "MÜLLER^JÜRGEN", "MÜLLER^JÖRG", "GARÇON^FRANÇOIS", "ÅSTRÖM^BJÖRN",
    "NUÑEZ^IÑIGO", "DÍAZ^JOSÉ", "ØSTERGÅRD^SØREN", "FRÈRE^HÉLÈNE",
    "SCHÖN^GRETA", "ÇELIK^AYLA", "STRAUß^JOHANN",
    "GÓMEZ^ÁLVARO",
]
UTF8_NAMES = [
    "ŁUKASIEWICZ^JAN", "DVOŘÁK^ANTONÍN", "ΔΗΜΗΤΡΙΟΥ^ΝΙΚΟΣ", "ИВАНОВ^ИВАН",
    "ÇELİK^AYŞE", "KOVÁČ^ĽUBOŠ",
]
JAPANESE_NAMES = [
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "Yamada^Hanako=山田^花子=やまだ^はなこ",
    "Tanaka^Ichiro=田中^一郎=たなか^いちろう",
    "Suzuki^Yuki=鈴木^雪=すずき^ゆき",
    "Sato^Kenji=佐藤^健二=さとう^けんじ",
    "Takahashi^Mai=高橋^舞=たかはし^まい",
]
CHARSETS = {"ascii": None, "latin1": "ISO_IR 100", "utf8": "ISO_IR 192", "japanese": ["", "ISO 2022 IR 87"]}

STUDY_DESCRIPTIONS = [
    "CHEST PA", "BRAIN W/O CONTRAST", "ABDOMEN PELVIS", "KNEE LEFT", "KNEE RIGHT",
    "SPINE LUMBAR", "HEART CARDIAC", "WHOLE BODY", "NECK SOFT TISSUE", "HAND",
]
PROCEDURE_CODES = [("P1-100", "CHEST"), ("P1-200", "HEAD"), ("P1-300", "ABDOMEN")]
MODALITY_SETS = [("CT", "MR"), ("CT", "CR"), ("MR", "US"), ("CT", "PT", "CT"), ("US",), ("CR", "OT"), ("MR", "MR", "CT")]
PHYSICIANS = ["WELBY^MARCUS", "HOUSE^GREGORY", "GREY^MEREDITH", "", "KILDARE^JAMES^^DR"]


@dataclass
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int
    path: Path | None = None


@dataclass
class Series:
    series_uid: str
    modality: str
    series_number: int
    description: str
    body_part: str
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Study:
    study_uid: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    physician: str
    procedure_code: tuple[str, str]
    series: list[Series] = field(default_factory=list)

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series}


@dataclass
class Patient:
    patient_id: str
    name: str
    charset: str
    birth_date: str
    sex: str
    studies: list[Study] = field(default_factory=list)


@dataclass
class Archive:
    """The generated hierarchy and where its files are."""

    directory: Path
    patients: list[Patient]

    @property
    def studies(self) -> list[Study]:
        return [s for p in self.patients for s in p.studies]

    @property
    def files(self) -> list[Path]:
        return [i.path for st in self.studies for se in st.series for i in se.instances if i.path]

    def patient_of(self, study_uid: str) -> Patient:
        return next(p for p in self.patients for s in p.studies if s.study_uid == study_uid)


def _uid(*parts: int) -> str:
    return UID_ROOT + ".".join(str(p) for p in parts)


def _dataset(patient: Patient, study: Study, series: Series, instance: Instance) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = instance.sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = instance.sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    charset = CHARSETS[patient.charset]
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_instance_uid
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.SeriesDate = study.date
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.ReferringPhysicianName = study.physician
    ds.StudyDescription = study.description
    ds.ProcedureCodeSequence = Sequence([_code(*study.procedure_code)])
    ds.SeriesDescription = series.description
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.BodyPartExamined = series.body_part
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.InstanceNumber = instance.instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if series.modality in ("CT", "MR") else ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    return ds


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99GW"
    item.CodeMeaning = meaning
    return item


def build_archive(directory: Path, studies: int = 320, seed: int = 1137) -> Archive:
    """Generate at least ``studies`` studies over 64 patients into ``directory``.

    Each patient gets five or six studies (the first patients get the extra ones)
    so the total matches ``studies`` exactly when ``studies >= 5 * 64``.
    """
    rng = random.Random(seed)
    names = (
        [(n, "ascii") for n in ASCII_NAMES]
        + [(n, "latin1") for n in LATIN1_NAMES]
        + [(n, "utf8") for n in UTF8_NAMES]
        + [(n, "japanese") for n in JAPANESE_NAMES]
    )
    while len(names) < 64:
        names.append((f"PATIENT^NUMBER {len(names):02d}", "ascii"))
    per_patient = [studies // len(names)] * len(names)
    for i in range(studies - sum(per_patient)):
        per_patient[i % len(names)] += 1
    patients: list[Patient] = []
    study_no = 0
    for p_index, (name, charset) in enumerate(names):
        birth = f"{rng.randint(1930, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        patient = Patient(f"PID{p_index:04d}", name, charset, birth, rng.choice("MFO"))
        for _ in range(per_patient[p_index]):
            study_no += 1
            year = rng.randint(2015, 2024)
            study = Study(
                study_uid=_uid(1, study_no),
                date=f"{year}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                time=f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}",
                accession=f"ACC{study_no:06d}",
                study_id=f"S{study_no}",
                description=rng.choice(STUDY_DESCRIPTIONS),
                physician=rng.choice(PHYSICIANS),
                procedure_code=rng.choice(PROCEDURE_CODES),
            )
            for s_index, modality in enumerate(rng.choice(MODALITY_SETS), start=1):
                series = Series(
                    series_uid=_uid(2, study_no, s_index),
                    modality=modality,
                    series_number=s_index,
                    description=f"{modality} SERIES {s_index}",
                    body_part=rng.choice(["CHEST", "HEAD", "ABDOMEN", "KNEE"]),
                )
                for n in range(1, rng.choice([1, 1, 2]) + 1):
                    series.instances.append(Instance(_uid(3, study_no, s_index, n), SOP_CLASS[modality], n))
                study.series.append(series)
            patient.studies.append(study)
        patients.append(patient)
    archive = Archive(directory, patients)
    directory.mkdir(parents=True, exist_ok=True)
    for patient in patients:
        for study in patient.studies:
            for series in study.series:
                for instance in series.instances:
                    instance.path = directory / f"{instance.sop_instance_uid}.dcm"
                    _dataset(patient, study, series, instance).save_as(instance.path, enforce_file_format=True)
    return archive


def simple_studies(directory: Path, count: int, patient_id: str = "BENCH", date: str = "20240101") -> list[Path]:
    """``count`` one-instance studies of one patient on one date (benchmark answers)."""
    directory.mkdir(parents=True, exist_ok=True)
    patient = Patient(patient_id, "BENCH^MARK", "ascii", "19700101", "O")
    paths = []
    for n in range(1, count + 1):
        study = Study(_uid(4, n), date, f"{n % 24:02d}0000", f"B{n:06d}", f"B{n}", "BENCH", "", PROCEDURE_CODES[0])
        series = Series(_uid(5, n), "CT", 1, "BENCH SERIES", "CHEST")
        instance = Instance(_uid(6, n), SOP_CLASS["CT"], 1, directory / f"b{n:06d}.dcm")
        _dataset(patient, study, series, instance).save_as(instance.path, enforce_file_format=True)
        paths.append(instance.path)
    return paths


def many_series_study(directory: Path, series_count: int, patient_id: str = "BENCHSER") -> list[Path]:
    """One study with ``series_count`` one-instance series (series-level benchmark)."""
    directory.mkdir(parents=True, exist_ok=True)
    patient = Patient(patient_id, "BENCH^SERIES", "ascii", "19700101", "O")
    study = Study(_uid(7, 1), "20240202", "101010", "BS000001", "BS1", "BENCH SERIES", "", PROCEDURE_CODES[1])
    paths = []
    for n in range(1, series_count + 1):
        series = Series(_uid(8, n), "MR", n, f"SERIES {n}", "HEAD")
        instance = Instance(_uid(9, n), SOP_CLASS["MR"], 1, directory / f"s{n:06d}.dcm")
        _dataset(patient, study, series, instance).save_as(instance.path, enforce_file_format=True)
        paths.append(instance.path)
    return paths
