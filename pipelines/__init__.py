"""Kubeflow pipelines over the ``components/`` of this repository; compiled IR YAML in ``compiled/``."""
