"""Teacher engines (vLLM, transformers reference) and the harvest job."""
