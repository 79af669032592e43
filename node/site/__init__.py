"""A site's workspace and its data: ingest, splits, checkpoints, status."""
