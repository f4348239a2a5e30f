"""litzoo: core."""
