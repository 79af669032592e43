"""The local audit: distances, attacks, the copy detector, the gate and its report."""
