"""latent-verbalizer: read what every layer of a vision transformer knows, in plain words.

    import latent_verbalizer as lv
    model = lv.load("coca_synth_demo")
    run = model.verbalize(["scene.png"], layers=[0, 3, 5])
    run.to_pandas()

The Python API is latent_verbalizer.api (loaded on first use, so `import latent_verbalizer` stays light).
This is the one import package the project installs: the repository's services/ and shared/ folders (the
user's layout) are mapped into it as latent_verbalizer.services and latent_verbalizer.shared (setup.py)."""

from __future__ import annotations

__all__ = ["Labels", "Model", "Report", "Run", "analyze", "categorize", "compare", "load"]


def __getattr__(name: str):
    if name in __all__:
        from latent_verbalizer import api

        return getattr(api, name)
    raise AttributeError(f"module 'latent_verbalizer' has no attribute {name!r}")
