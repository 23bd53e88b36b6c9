"""The ingest stage: corpus readers and the tokenize job (corpus → tokens store)."""
