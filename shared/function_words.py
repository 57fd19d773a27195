"""English function words: what a caption says that names nothing in the image. The embedded labeler
splits captions into phrases with them (services.categorizer.embedded.words); likelihood grounding
leaves them out of a caption's content words (shared.pmi)."""

from __future__ import annotations

DETERMINERS = frozenset(
    "a an the this these those some any its his her their my your our another each every no".split()
)
SPATIAL_PREPOSITIONS = frozenset(
    """on in at near under over above below behind beside besides between inside outside around along across
    through into onto against beneath underneath atop by upon toward towards within throughout""".split()
)
PREPOSITIONS = SPATIAL_PREPOSITIONS | frozenset("of with for from to about like as without during via per than".split())
CONJUNCTIONS = frozenset("and or but nor & plus".split())
AUXILIARIES = frozenset(
    """is are was were be been being am has have had does do did can will would could should may might must
    that which who whom whose where when while it they them him i me we us you there here""".split()
)
FUNCTION_WORDS = DETERMINERS | PREPOSITIONS | CONJUNCTIONS | AUXILIARIES
