"""Cell feature encoders behind `bs.tl.cell_features` (a registry)."""
