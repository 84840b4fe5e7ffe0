"""A search as a front asks it of an archive: the level's keys, what to return, and
the UIDs above it. C-FIND builds one from its identifier and (next) QIDO-RS from its
query string; every upstream answers it and the front re-checks each answer with the
keys' PS3.4 matching rules, so an archive may filter loosely, never strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.model.query import Key


@dataclass(frozen=True)
class Search:
    """One search at study, series or instance level (UIDs above it in the path)."""

    keys: tuple[Key, ...] = ()
    include: tuple[int, ...] = ()
    include_all: bool = False  # QIDO-RS ``includefield=all``: every attribute the archive has
    # The caller reads nothing but ``include`` and the keys (C-FIND): an archive may
    # leave out every other attribute. QIDO-RS returns its level's defaults too, so
    # the facade leaves this False.
    include_only: bool = False
    study_uid: str | None = None
    series_uid: str | None = None
