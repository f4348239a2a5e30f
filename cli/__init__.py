"""What ``train.py`` (the ``litzoo`` command) adds around LightningCLI: class discovery, short messages for bad
input, the W&B logger's online/offline choice and per-run output folders. Imports anything; nothing in core,
lit_modules, datamodules or callbacks imports it."""
