"""Orthanc glue: its configuration, a REST client, and the enqueue-only Python plugin."""
