"""Commands: one thin Typer module per CLI command; each imports its heavy libraries inside the function."""
