"""``python -m musepayne``: the command line tool."""

from .cli import main

main()
