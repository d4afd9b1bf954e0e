"""fastdiff ops: one module per op (schema, reference, dispatch)."""
