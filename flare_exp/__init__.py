"""flare-exp: an experiment pipeline for FLARE cross-lingual transfer."""

__version__ = "0.1.0"
