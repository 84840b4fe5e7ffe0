"""The audit trail (IHE ATNA): DICOM audit messages (`message`) delivered by syslog
and/or to a file without ever blocking the caller (`trail`), made from what the fronts
know (`auditor`)."""
