"""Refusal of inputs that are not dermoscopic lesion images: fitting a run's detector and measuring it."""
