"""Scaffolding, not the trainer: the tiny models every family is tested and demonstrated with (tiny.py), and
real-size architectures built from their published configs with random weights (real.py), all offline.
Nothing in the training path imports this package."""
