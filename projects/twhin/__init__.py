"""TwHIN graph embeddings: config, data (edges, vocabularies, batches with negatives), model, evaluation,
export and the use of exported vectors; the entry point is main.py (docs/twhin.md)."""
