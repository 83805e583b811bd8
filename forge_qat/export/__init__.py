"""Export of finalized artifacts to the formats models are served in, one module per format (`gguf`).

Callers import from the submodules.
"""
