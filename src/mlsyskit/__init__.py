"""mlsyskit: ML systems, for real."""

__version__ = "0.1.0"
