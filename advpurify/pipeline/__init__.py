"""Batch purification of folders: plan, read -> batch -> purify -> write, resume."""
