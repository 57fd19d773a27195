"""latent-verbalizer: read what every layer of a vision transformer knows, in plain words.

The one import package the project installs. The repository keeps the user's layout (services/encoder,
services/decoder, services/categorizer, shared/); pyproject.toml maps those folders into this package as
`latent_verbalizer.services` and `latent_verbalizer.shared`, so installing it adds no generic top-level names."""
