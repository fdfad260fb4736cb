"""Plans and the cut: what each layer keeps, applying a plan with its corrections, and the parameter / FLOP accounting of a budget."""
