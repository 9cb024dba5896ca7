"""What comes out: partial results while a batch runs, curation marks, resubmitting the failed."""
