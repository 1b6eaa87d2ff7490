"""The sampling engine: everything that touches torch lives below this package."""
