"""Typed application keys shared by the facade's route modules."""

from __future__ import annotations

from aiohttp import web

from gateway.audit.auditor import Auditor
from gateway.config import Config
from gateway.retrieval.engine import Retriever
from gateway.spool.forwarder import Problems
from gateway.spool.queue import Spool
from gateway.upstream.base import Upstream
from gateway.web.archive_health import ArchiveHealth
from gateway.web.cache import FacadeCache
from gateway.web.oidc import Admission
from gateway.web.refusals import RefusedSeries
from gateway.web.whole_instance import WholeInstanceFrames

SPOOL = web.AppKey("spool", Spool)
UPSTREAM = web.AppKey("upstream", Upstream)
CONFIG = web.AppKey("config", Config)
# The retrieval engine the DIMSE front shares: spill directory, codec threads, budget.
RETRIEVER = web.AppKey("retriever", Retriever)
# What keeps delivery from working right now (the forwarder's), for /healthz.
PROBLEMS = web.AppKey("problems", Problems)
# The archive's last health probe, and the one under way (for /healthz).
ARCHIVE_HEALTH = web.AppKey("archive_health", ArchiveHealth)
# Frames and metadata of a remote upstream kept on disk; None over the embedded archive.
CACHE = web.AppKey[FacadeCache | None]("facade_cache")
# Series whose frames are cut from their instances, the archive having refused RetrieveFrames.
REFUSED_SERIES = web.AppKey("refused_series", RefusedSeries)
# Frames cut from instances retrieved whole, all of an instance's at once; None without a cache.
WHOLE_INSTANCE_FRAMES = web.AppKey[WholeInstanceFrames | None]("whole_instance_frames")
# The audit trail (a no-op one without [audit]).
AUDIT = web.AppKey("audit", Auditor)
# Who the request's credentials say it is (`auth.admitted`), for the audit trail.
USER = web.RequestKey("user", str)
# What an OpenID provider's token admitting the request grants (absent for other credentials).
ADMISSION = web.RequestKey("admission", Admission)
