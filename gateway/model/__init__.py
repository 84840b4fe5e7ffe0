"""The neutral query model shared by both fronts and every upstream: keys, levels,
PS3.4 matching rules, the `Search` value and DICOM JSON. Imports nothing of ours but
`gateway.uids`, so anything may import it."""
