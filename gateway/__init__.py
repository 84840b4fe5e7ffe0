"""dicom-gateway: DIMSE to DICOMweb gateway with a durable spool."""
