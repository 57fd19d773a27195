"""The package layout, the one thing pyproject.toml cannot say: installing latent-verbalizer adds one import
package, `latent_verbalizer`, and no generic top-level names. The repository keeps the user's layout
(services/encoder, services/decoder, services/categorizer, shared/); each folder is mapped into the package:

    latent_verbalizer/   -> latent_verbalizer            (the Python API)
    services/...         -> latent_verbalizer.services...
    shared/...           -> latent_verbalizer.shared...
"""

from setuptools import find_packages, setup

MAPPED = ("services", "shared")

setup(
    packages=["latent_verbalizer"]
    + [f"latent_verbalizer.{name}" for name in find_packages(include=[f"{top}*" for top in MAPPED])],
    package_dir={"latent_verbalizer": "latent_verbalizer", **{f"latent_verbalizer.{top}": top for top in MAPPED}},
)
