"""Drift monitoring: inference log, reference profile, drift per site and scanner, alerts, dashboard.

``features`` (what is compared), ``inference_log`` (what the router appends), ``reference`` (what the
champion's data looked like, stored in MLflow), ``drift`` (Evidently reports per group and the alert
rules), ``alerts`` (webhook), ``dashboard`` (Evidently workspace/UI, MLflow copy), ``job`` (one run with
all its side effects, for the CLI, the KFP component and the schedules).
"""
