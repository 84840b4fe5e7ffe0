"""Run dcmtk ``findscu`` and read its answers as comparable values.

Answers from two SCPs are compared as decoded values, not bytes: Orthanc answers in
UTF-8 whatever the request asked, the gateway in the requested character set when
the values fit it, and both are right. Text keys given to :func:`find` are encoded
in the request's own character set before they reach findscu's command line.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tests.support.dcmtk import DCMTK_BIN, LOOPBACK, dcmtk_env

#: Keys whose value order carries no meaning (PS3.4: sets reported as multiple values).
UNORDERED = {"ModalitiesInStudy", "SOPClassesInStudy"}
#: Keys that legitimately differ between two SCPs.
SCP_SPECIFIC = {"SpecificCharacterSet", "RetrieveAETitle"}

_PENDING = re.compile(r"^I: Find Response: \d+ \(Pending", re.MULTILINE)
_FINAL = re.compile(r"Received Final Find Response \((.*?)\)|Final Find Response.*?status\s*=?\s*0x([0-9a-fA-F]{4})")


@dataclass
class FindResult:
    """What findscu reported. ``answers`` is empty when the call asked findscu to
    print its answers instead of writing them; ``count`` is the number of Pending
    responses either way."""

    returncode: int
    answers: list[Dataset]
    final: str
    output: str
    count: int

    def dumped(self, tag: str) -> list[str]:
        """Each answer's value of ``tag`` (``"0020,000d"``) as findscu's ``-v`` dump
        shows it, in the order received (``read_answers=False``: reading ten thousand
        answers' files with pydicom takes seconds). The request's own dump comes
        before the first response."""
        _, _, responses = self.output.partition("Find Response:")
        line = re.compile(rf"^I: \({re.escape(tag.lower())}\) \w\w \[(.*?)\]", re.MULTILINE)
        return line.findall(responses)


def _argv_text(text: str, charset: list[str]) -> str:
    """``text`` as the bytes findscu must send, smuggled through argv as a str."""
    raw = encode_string(text, convert_encodings(charset or ["ISO_IR 6"]))
    return raw.decode("utf-8", "surrogateescape")


def find(
    port: int,
    called_ae: str,
    keys: dict[str, str],
    model: str = "study",
    charset: list[str] | None = None,
    timeout: float = 120.0,
    extra_args: list[str] | None = None,
    read_answers: bool = True,
) -> FindResult:
    """One C-FIND; ``keys`` maps keyword to value (``""`` = return key).
    ``read_answers=False``: findscu prints each answer instead of writing it to a
    file for pydicom (see `FindResult.dumped`)."""
    args: list[str] = []
    if charset is not None:
        args.append("SpecificCharacterSet=" + "\\".join(charset))
    for keyword, value in keys.items():
        args.append(f"{keyword}={_argv_text(value, charset or [])}" if value else keyword)
    flag = {"study": "-S", "patient": "-P"}[model]
    with tempfile.TemporaryDirectory(prefix="findscu-") as out:
        argv = [str(DCMTK_BIN / "findscu"), flag, "-v", "-aet", "FINDSCU", "-aec", called_ae, *(["-X", "-od", out] if read_answers else []), *(extra_args or [])]
        for arg in args:
            argv += ["-k", arg]
        # Output is bytes: findscu echoes identifiers in whatever character set they use.
        proc = subprocess.run(
            [*argv, LOOPBACK, str(port)], env=dcmtk_env(), capture_output=True, timeout=timeout, check=False
        )
        files = sorted(Path(out).iterdir())
        answers = [pydicom.dcmread(f) for f in files] if read_answers else []
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    match = _FINAL.search(text)
    final = (match.group(1) or match.group(2)) if match else "none"
    return FindResult(proc.returncode, answers, final, text, len(files) if read_answers else len(_PENDING.findall(text)))


def value_of(elem: Any) -> Any:
    """A comparable form of an element value (sequences become tuples of dicts)."""
    if elem.VR == "SQ":
        return tuple(normalise(item) for item in elem.value)
    value = elem.value
    if value is None or value == "":
        return ""
    if isinstance(value, (list, MultiValue)):
        values = [str(v) for v in value]
        return tuple(sorted(values)) if elem.keyword in UNORDERED else tuple(values)
    if elem.VR in ("IS", "DS"):
        return str(float(value))
    if elem.VR == "PN":
        return str(value).rstrip("^= ")
    return str(value).strip()


def normalise(ds: Dataset, ignore: set[str] = SCP_SPECIFIC) -> dict[str, Any]:
    """Keyword -> comparable value, without the keys that differ by SCP."""
    return {elem.keyword or str(elem.tag): value_of(elem) for elem in ds if elem.keyword not in ignore}


def answer_set(result: FindResult, unique: str) -> dict[str, dict[str, Any]]:
    """Answers by their unique key value."""
    out = {}
    for ds in result.answers:
        values = normalise(ds)
        out[str(values.get(unique, ""))] = values
    return out
