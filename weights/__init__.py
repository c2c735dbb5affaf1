"""Checkpoint layouts and loading: the only place where reference tensor names appear."""
