"""retfm: how pre-training data shapes retinal foundation models."""

__version__ = "0.1.0"
