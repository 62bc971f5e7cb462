"""Phantom training: PO loss (loss.py, pure torch), the DeepSpeed recipe (recipe.py, no Ray), the
Ray Train adapter (ray_trainer.py), typed config (config.py) and the ``phantom-ray train`` verb.

Ray and DeepSpeed are imported inside functions only, so importing this package is cheap.
"""
