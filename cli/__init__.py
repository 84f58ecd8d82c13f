"""The `gtorrent` command line: a thin typer + rich layer over the `gtorrent` library."""
