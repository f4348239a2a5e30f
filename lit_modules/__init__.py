"""litzoo: lit_modules."""
