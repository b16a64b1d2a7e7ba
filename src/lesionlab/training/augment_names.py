"""The ``augment`` setting's spellings: which extras exist, their canonical order, and the check of a value.

Apart from ``training.augment`` (the transforms themselves, which need torch), so that ``TrainConfig`` checks the
setting without importing torch.
"""

from __future__ import annotations

EXTRAS = ("shortcuts", "color", "aspect")  # also the order in which they are applied and spelled


def augment_parts(augment: str) -> tuple[str, ...]:
    """The extras of ``augment`` (``dermoscopy`` -> ``()``) in their canonical order; ValueError naming the
    allowed spellings when it is not one of them."""
    base, *extras = augment.split("+")
    if base == "none" and not extras:
        return ()
    if base != "dermoscopy" or len(set(extras)) != len(extras) or not set(extras) <= set(EXTRAS):
        raise ValueError(
            f"augment must be auto, none, dermoscopy, or dermoscopy+EXTRA[+EXTRA...] with extras from "
            f"{', '.join(EXTRAS)} (e.g. dermoscopy+shortcuts+color+aspect); got '{augment}'"
        )
    return tuple(e for e in EXTRAS if e in extras)


def canonical_augment(augment: str) -> str:
    """``augment`` with its extras in the canonical order (``dermoscopy+color+shortcuts`` ->
    ``dermoscopy+shortcuts+color``), so two spellings of one augmentation are one setting."""
    if augment in ("auto", "none"):
        return augment
    return "+".join(["dermoscopy", *augment_parts(augment)])
