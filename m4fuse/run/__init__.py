"""A run's settings, workspace, data provisioning, tracking and reports."""
