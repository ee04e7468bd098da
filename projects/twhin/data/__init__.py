"""TwHIN data: the edge decoder, string-key vocabularies, training batches with their negatives, synthetic
graphs."""
