"""``python -m gateway`` is the ``dicom-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())
