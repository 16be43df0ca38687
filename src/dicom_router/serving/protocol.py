"""The names the predictor and its clients agree on (V2 protocol): standard library only, so a client
needs neither the model server nor its dependencies."""

from __future__ import annotations

MODEL_NAME = "bodypart-router"
"""The model's name in ``/v2/models/<name>/…`` (the InferenceService's predictor)."""
INPUT = "dicom"
"""The BYTES input: one base64-encoded DICOM file per element."""
OUTPUTS = ("label", "probabilities", "confidence", "low_confidence")
"""What every answer has; ``EXTRA_OUTPUTS`` only when asked for."""
NOVELTY = "novelty"
"""How unlike the training images each input is (above 1.0: unfamiliar, the router sends it to
review): in every answer of a bundle that computes it, absent for bundles exported before it."""
EXTRA_OUTPUTS = ("embedding", "image_statistics")
"""The bundle's embedding and the decoded image's statistics (the inference log's inputs)."""
SHADOW_OUTPUTS = ("shadow_label", "shadow_confidence", "shadow_version")
"""The challenger's answer when a model is in shadow (alias ``challenger``): logged, never routed by;
absent from the answer when no challenger is loaded."""
REVIEW_THRESHOLD = "review_threshold"
"""A parameter of every answer of a model that has one: the confidence its collection-grouped
cross-validation found to keep auto-routed accuracy at 99% (the router's ``below_confidence: model``)."""
