"""Routing: each instance Orthanc receives is classified, then forwarded by a declarative rules file.

``rules`` is the pure part (the rules model and its evaluation, no I/O beyond reading the file), so a
rules file can be checked and dry-run anywhere; the worker and its queue do the talking to Orthanc.
"""
