"""Data movement and stage running for the Spikformer V2 pipeline."""
