"""Shipped structures and configs, installed with the package (see assemble.resolve_path)."""
