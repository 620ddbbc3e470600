"""Core semantics: inputs, masks, the reference and the dropout hash."""
