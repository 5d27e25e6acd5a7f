"""DetailFusion composed image retrieval: data, models, training, evaluation, tracking, registry."""

__version__ = "0.1.0"
