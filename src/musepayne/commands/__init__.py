"""One module per ``musepayne`` subcommand, plus shared CLI helpers."""
