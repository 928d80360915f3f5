"""One module per command: a frozen Config, a Result and ``run``-style entry points."""
