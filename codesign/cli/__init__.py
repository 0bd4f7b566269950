"""The `codesign` command line."""
