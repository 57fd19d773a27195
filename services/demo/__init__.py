"""The offline demo: synthetic scenes, the small CoCa trained on them, and the main job that shows it."""
