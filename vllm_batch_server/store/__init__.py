"""What is kept: the SQLite database, blobs on disk, the lifecycle of a batch and its event log."""
