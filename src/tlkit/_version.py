"""The package version, in a leaf module so the package's own modules never import its root."""

__version__ = "0.1.0"
