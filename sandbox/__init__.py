"""sbx: a rootless-first sandbox for untrusted code."""

__version__ = "0.1.0"
