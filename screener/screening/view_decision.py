"""Which view an image shows: the tags and the image classifier (engine call 1's view head)
both vote; the image decides when they disagree, since tags are often wrong or missing."""

from __future__ import annotations

from dataclasses import dataclass

FRONTAL_TAGS = ("PA", "AP")


@dataclass(frozen=True)
class ViewDecision:
    view: str  # PA | AP | LATERAL | UNKNOWN
    source: str  # tag | image
    image_view: str  # FRONTAL | LATERAL
    image_confidence: float
    frontal: bool


def decide_view(view_tag: str | None, lateral_probability: float) -> ViewDecision:
    """Tags and the image classifier both vote; the image decides when they disagree."""
    image_lateral = lateral_probability >= 0.5
    image_view = "LATERAL" if image_lateral else "FRONTAL"
    confidence = lateral_probability if image_lateral else 1.0 - lateral_probability
    if view_tag in FRONTAL_TAGS and not image_lateral:
        return ViewDecision(view_tag, "tag", image_view, confidence, True)
    if view_tag == "LATERAL" and image_lateral:
        return ViewDecision("LATERAL", "tag", image_view, confidence, False)
    if image_lateral:
        return ViewDecision("LATERAL", "image", image_view, confidence, False)
    return ViewDecision("UNKNOWN", "image", image_view, confidence, True)
