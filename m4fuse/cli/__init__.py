"""The ``m4fuse`` console command: one subcommand per pipeline stage."""
