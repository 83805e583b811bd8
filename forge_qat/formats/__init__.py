"""The on-disk contracts: one typed owner per file forge writes or reads."""
