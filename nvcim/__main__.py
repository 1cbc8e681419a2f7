"""``python -m nvcim``: the ``nvcim`` command line."""

from nvcim.tools.cli import main

main(prog_name="nvcim")
