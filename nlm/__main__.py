"""`python -m nlm ...` is the `nlm` command."""

from nlm.cli import main

main()
