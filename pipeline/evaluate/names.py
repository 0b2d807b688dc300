"""The scorers evaluation knows, by config name (a leaf module: config validation imports it)."""

SCORER_NAMES = ("clip", "pickscore", "hpsv2", "aesthetic", "imagereward", "style")

# The smallest score difference a paired comparison counts as a win; closer pairs are ties. Below it a difference
# is the scorer's numerical dust, not a judgement: the toy style scorer gives a flat image ~1e-6 and a sketch ~1,
# and counting 3e-6 against 1e-6 as a win once made a win rate contradict the style share beside it. Each margin is
# about 1% of the spread of the scorer's values between clearly different images: style (a probability) 0.01;
# clip and pickscore (100 x cosine, spread ~5) 0.05; hpsv2 (a cosine, spread ~0.05) 0.0005; aesthetic (1-10) 0.01;
# imagereward (standardised by its authors, spread ~2) 0.02. evaluate.tie_margins overrides them.
TIE_MARGINS = {"clip": 0.05, "pickscore": 0.05, "hpsv2": 0.0005, "aesthetic": 0.01, "imagereward": 0.02,
               "style": 0.01}
