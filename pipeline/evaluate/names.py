"""The scorers evaluation knows, by config name (a leaf module: config validation imports it)."""

SCORER_NAMES = ("clip", "pickscore", "hpsv2", "aesthetic", "imagereward", "style")
