"""The Orthanc-compatible REST API (FastAPI): same routes and JSON shapes, reading the same archive."""
