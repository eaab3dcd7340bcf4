"""The bundled demo: synthetic shape images with captions (data.py) and an evaluator that reads colour,
shape and position back from images (evaluate.py). The demo model trained on them is still to come."""
