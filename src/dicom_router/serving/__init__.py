"""The model server: the KServe predictor, its local entrypoint and the InferenceService renderer."""
