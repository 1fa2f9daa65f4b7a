"""Sequential LDA (Crawford & Pineau): tasks are mixtures of shared sequence generators.

Only the generators (topics) live here so far; see :mod:`.generators`.
"""
