"""Batch retrieval with the registered champion model."""
