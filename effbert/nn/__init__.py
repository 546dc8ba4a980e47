"""Drop-in modules built on effbert.ops."""
