"""The systolic-array reference executor (docs/SYSTOLIC.md) and the hardware reference export
(docs/REFERENCE_EXPORT.md)."""
