"""An emulator of AWS HealthImaging's HTTP APIs, faithful on the wire.

The real service cannot be reached from the test machines, so this package serves
what its developer guide and botocore's ``medical-imaging`` model describe, on two
loopback ports (the ``dicom-`` and ``runtime-`` hosts):

* every request's AWS Signature Version 4 is recomputed from the specification
  (`sigv4`), with the credentials of `identity`, and refused with 403 and AWS's
  error shape when it does not verify;
* the DICOMweb representations (STOW-RS, QIDO-RS, WADO-RS) under
  ``/datastore/{id}`` and the native image-set operations, over one `store`;
* per-operation throttling at the service's default quotas (`throttle`).

`Emulator` runs it in a thread of its own, for synchronous tests and daemons alike.
"""

from tests.support.healthimaging.identity import Identities, session_credentials
from tests.support.healthimaging.server import Emulator

__all__ = ["Emulator", "Identities", "session_credentials"]
