"""Code used by two or more services: settings, schemas, model loading, logging."""
