"""Training and eval data, in three stages: sources (which files, read in shards) -> encode (token ids and
loss masks) -> store (tokenized once into a memory-mapped Arrow cache, packed into sequences on read).

Callers import from the submodules; this package imports nothing, so the tokenizing worker processes
that `store` starts stay free of torch.
"""
