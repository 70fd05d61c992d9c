"""Workflows built on the whole stack: the demo (`nlm demo`) and its one-process foundation twin."""
