"""Models: the backbone registry and ImageNet weights, the classifier, and the lesion detector."""
