"""Zero-shot CLIP: the hand-written prompt "a photo of a {class}.", no parameters."""
from __future__ import annotations

from .base import Method, register


@register("zeroshot")
class ZeroShot(Method):
    """Text features depend only on frozen weights: with caching on they are computed once."""

    def text_features(self, template=None):
        template = template or self.template
        return self.cached(("text", template.key), lambda: super(ZeroShot, self).text_features(template))
