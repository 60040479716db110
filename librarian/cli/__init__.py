"""The `librarian` command: its parser and subcommands (demo, runs, plots, compare, ...). The top layer."""
