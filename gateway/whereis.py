"""Where is my study: what the spool received of it beside what the archive holds.

For ``dicom-gateway study UID``, the first question a modality admin is asked. The
spool says which series arrived, from which AE titles, when, and how far each
instance got (`gateway.spool.study`); the archive, asked with one series-level search
in the study, says how many instances of each series it holds. Side by side they show
at a glance an instance still on its way, one the archive refused (with its reason),
or a series the archive has from elsewhere. Runs beside the daemon: the spool is
only read, and the archive is asked with the config's own credentials.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from gateway.model.json import first_text
from gateway.model.search import Search
from gateway.spool.queue import STATES
from gateway.spool.study import SeriesInSpool
from gateway.upstream import make_upstream
from gateway.upstream.errors import NotFound

SERIES_UID = 0x0020000E
SERIES_NUMBER = 0x00200011
MODALITY = 0x00080060
SERIES_INSTANCES = 0x00201209  # NumberOfSeriesRelatedInstances


@dataclass
class SeriesInArchive:
    series_uid: str
    instances: int | None  # None: the archive did not say
    modality: str = ""
    number: str = ""


@dataclass
class ArchiveView:
    """The study's series in the archive, or why the archive could not be asked."""

    series: list[SeriesInArchive] = field(default_factory=list)
    error: str | None = None


async def archive_view(config: Config, study_uid: str) -> ArchiveView:
    """One series-level search in the study. The embedded archive is read without
    being started: starting it would spawn a second writer process beside the
    running daemon's, and its searches only read the index."""
    upstream = make_upstream(config)
    view = ArchiveView()
    try:
        if config.upstream.type != "local":
            await upstream.start()
        search = Search(study_uid=study_uid, include=(SERIES_UID, SERIES_NUMBER, MODALITY, SERIES_INSTANCES))
        async for obj in upstream.search_for_series(search):
            count = first_text(obj, SERIES_INSTANCES)
            view.series.append(
                SeriesInArchive(
                    first_text(obj, SERIES_UID),
                    int(count) if count.isdigit() else None,
                    first_text(obj, MODALITY),
                    first_text(obj, SERIES_NUMBER),
                )
            )
    except NotFound:
        pass  # no such study in the archive: no series
    except Exception as exc:  # noqa: BLE001 - any failure is the answer shown, not a traceback
        view.series, view.error = [], str(exc) or type(exc).__name__
    finally:
        await upstream.close()
    return view


def _archive_fields(series: SeriesInArchive | None) -> dict[str, str]:
    return {"modality": series.modality if series else "", "series_number": series.number if series else ""}


def report(
    study_uid: str, spool: list[SeriesInSpool], archive: ArchiveView | None, discarded_at: float | None = None
) -> dict[str, Any]:
    """Both views merged per series (the spool's arrival order, then series only the
    archive has), as ``--json`` prints it, with when ``spool discard`` last withdrew
    the study (None: never)."""
    in_archive = {s.series_uid: s for s in archive.series} if archive is not None else {}
    unknown = archive is None or archive.error is not None  # the archive's count is not known
    rows: list[dict[str, Any]] = []
    for s in spool:
        a = in_archive.pop(s.series_uid, None)
        counted = a.instances if a is not None else (None if unknown else 0)
        rows.append({**s.as_json(), **_archive_fields(a), "archive_instances": counted})
    for a in in_archive.values():
        rows.append(
            {**SeriesInSpool(a.series_uid).as_json(), "states": None, **_archive_fields(a), "archive_instances": a.instances}
        )
    return {
        "study_uid": study_uid,
        "discarded_at": discarded_at,
        "series": rows,
        "archive": None if archive is None else {  # None: not asked
            "error": archive.error,
            "series": len(archive.series),
            "instances": sum(a.instances or 0 for a in archive.series),
        },
    }


def _when(t: float | None, day: bool = True) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if day else "%H:%M:%S", time.localtime(t))


def format_report(data: dict[str, Any], upstream_kind: str) -> str:
    """The report as a table an admin reads in a terminal: one line per series with
    its counts per spool state and the archive's count, then where it came from, when,
    and the reason of every refusal."""
    lines = [f"study {data['study_uid']}"]
    if data.get("discarded_at") is not None:
        lines.append(
            f"  discarded by an administrator (spool discard) at {_when(data['discarded_at'])}:"
            " what the gateway had received of it before then is withdrawn, never sent"
        )
    archive = data["archive"]
    if not data["series"]:
        nowhere = "neither the spool nor the archive holds" if archive and not archive["error"] else "the spool holds"
        lines.append(f"  {nowhere} any instance of it")
    header = f"  {'series':<64}  {'received':>8}" + "".join(f"  {c:>9}" for c in STATES) + f"  {'archive':>7}"
    if data["series"]:
        lines.append(header)
    for row in data["series"]:
        counted = "?" if row["archive_instances"] is None else str(row["archive_instances"])
        states = row["states"]
        counts = "".join(f"  {states[c] if states else '-':>9}" for c in STATES)
        lines.append(f"  {row['series_uid']:<64}  {row['instances']:>8}{counts}  {counted:>7}")
        about = [x for x in (row["modality"], f"series {row['series_number']}" if row["series_number"] else "") if x]
        if states:
            senders = ", ".join(f"{ae or '?'} ({n})" for ae, n in sorted(row["calling_aes"].items()))
            about.append(f"from {senders}")
            about.append(f"received {_when(row['first_received'])} to {_when(row['last_received'], day=False)}")
            if row["last_delivered"] is not None:
                about.append(f"last delivered {_when(row['last_delivered'])}")
        else:
            about.append("not in the spool (never received here, or purged after delivery)")
        lines.append("      " + "; ".join(about))
        for destination, counts in sorted((row.get("copies") or {}).items()):
            told = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
            lines.append(f"      copies to {destination}: {told}")
        for e in sorted(row["errors"], key=lambda e: -e["instances"]):
            state = "dead" if e["state"] == "dead" else "failed, to be retried"
            lines.append(f"      {e['instances']} {state}: {e['error']}")
    if archive is None:
        lines.append("archive: not asked")
    elif archive["error"]:
        lines.append(f"archive ({upstream_kind}): could not be asked: {archive['error']}")
    else:
        lines.append(f"archive ({upstream_kind}): {archive['instances']} instances in {archive['series']} series")
    return "\n".join(lines)
