"""litzoo: callbacks."""
