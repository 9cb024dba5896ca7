"""What runs: the scheduler picks batches, the runner feeds one to the engine and checkpoints results."""
