"""The M4Fuse network: the model in one file and its selective scan."""
