"""litzoo: datamodules."""
