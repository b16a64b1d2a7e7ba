"""Ensembles as model folders: members, cross-fit layouts, evaluation."""
