"""Subcommands of the ``m4fuse`` console command (see :mod:`m4fuse.cli`)."""
