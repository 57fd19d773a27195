"""The offline labeler: caption splitting, word lexicon and rules, MiniLM for unknown words."""
