"""Command-line utilities run with `python -m segjax.tools.NAME`."""
