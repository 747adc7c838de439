"""Tests (a package, so helpers import as tests.<folder>.<module>)."""
