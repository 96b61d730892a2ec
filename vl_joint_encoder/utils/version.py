"""The package version (here, at the bottom layer, so that model cards and manifests can record it)."""

__version__ = "0.2.0"
