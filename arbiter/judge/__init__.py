"""The arbiter's pairwise judge: pair data (data.py), model, training, evaluation and serving."""
