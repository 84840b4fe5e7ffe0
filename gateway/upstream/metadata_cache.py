"""The embedded archive's instance metadata, kept as JSON text between requests, for
the instances whose text its index does not keep (indexed by an earlier version and
not yet asked, or longer than `archive_metadata.KEPT_METADATA_MAX`).

Building an instance's metadata means reading its file with pydicom and converting
every element: 0.7 ms for a 512 x 512 CT, so a 300-instance series took 206 ms a
request against Orthanc's 182. A viewer asks the same series again (another
workstation, a reload), and the files do not change once stored. Entries are the
compact JSON text, not the objects: a fresh object per request (callers may change
what they get), and a tenth of the memory. An entry holds only while its file is the
one it was built from (inode, size and modification time), so an instance stored
again under the same name is read again. Least recently used entries go first once
the texts pass the budget.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from gateway.upstream.base import JsonObject

# What the cached texts may take; a 512 x 512 CT's metadata is ~1.6 KB.
BUDGET_BYTES = 64 * 1024 * 1024

Stamp = tuple[int, int, int]  # inode, size, modification time (ns)


class MetadataCache:
    """File name -> metadata JSON, checked against the file's stamp; thread-safe (the
    files are read on worker threads, several requests at once)."""

    def __init__(self, budget: int = BUDGET_BYTES) -> None:
        self.budget = budget
        self.held = 0
        self._entries: OrderedDict[str, tuple[Stamp, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, stamp: Stamp) -> JsonObject | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry[0] != stamp:
                return None
            self._entries.move_to_end(name)
            text = entry[1]
        return json.loads(text)  # type: ignore[no-any-return]

    def put(self, name: str, stamp: Stamp, obj: JsonObject) -> None:
        """Keep ``obj``; one larger than an eighth of the budget is not kept (it would
        push out the metadata of hundreds of ordinary instances)."""
        text = json.dumps(obj, separators=(",", ":"))
        if len(text) > self.budget // 8:
            return
        with self._lock:
            old = self._entries.pop(name, None)
            if old is not None:
                self.held -= len(old[1])
            self._entries[name] = (stamp, text)
            self.held += len(text)
            while self.held > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.held -= len(dropped)
