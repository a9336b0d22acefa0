"""``python -m musepayne.cli``: the command line tool."""

from . import main

main()
