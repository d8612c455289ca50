"""The package version, in a leaf module: files on disk record it, and nothing it imports can cycle."""

__version__ = "0.1.0"
