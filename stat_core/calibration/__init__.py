"""Calibration statistics: the layer runner, the gradient pass, save/load/merge, and the reducer that spreads them over processes."""
