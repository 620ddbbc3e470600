"""Drop-in Haiku modules built on the mechanisms."""
