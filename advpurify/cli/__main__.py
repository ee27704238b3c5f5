"""``python -m advpurify.cli``: the same as the ``advpurify`` program."""

from advpurify.cli import main

main()
