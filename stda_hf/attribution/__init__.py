"""The explanation engine shared by ``train.py`` and ``stda explain``: Deep Taylor Decomposition through Zennit,
relevance shares inside masks, heatmap rendering and the evaluation hook."""
