"""QAT: the recipe registry, its numerics, prepare and convert, coverage, fake quantizers."""
