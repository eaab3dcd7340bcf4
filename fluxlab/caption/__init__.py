"""Captioning images for training: a catalog of captioners (Florence-2, Qwen2.5-VL, the demo's own) and their
loaders. service.caption runs them over a folder or zip for every front end."""
