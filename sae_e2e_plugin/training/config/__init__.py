"""The run's config: its classes, its fields' types, shapes and numbers, and building it from
fields, YAML files and command-line flags (model-free checks, before anything loads)."""
