"""The ranking modes `search` offers, apart from search itself: the command line lists them
in every command's parser, and this module imports nothing, so no command loads numpy or
SQLite just to build its `--help`."""

MODE_HYBRID = "hybrid"
MODE_VECTOR = "vector"
MODE_BM25 = "bm25"
MODES = (MODE_HYBRID, MODE_VECTOR, MODE_BM25)
# Hybrid measured better than either alone on tests/data/relevance (README, "From a folder of
# notes to search"), so it is the default.
DEFAULT_MODE = MODE_HYBRID
