"""Bridges to other libraries (optional dependencies, imported only when used)."""
