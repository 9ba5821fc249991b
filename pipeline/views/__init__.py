"""Views of a finished (or stopped) run: polars frames, `why`, and report.html."""
