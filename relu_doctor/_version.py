"""The package version: a leaf, so ``relu-doctor --version`` and the run-directory writer
read it without importing the package (and torch)."""

__version__ = "0.1.0"
