"""Graph passes that keep what the model computes: simplify, fold BatchNormalization."""
