"""One module per adapter kind; each registers itself (`kind.register_kind`). Every module here whose
name does not start with "_" is imported by the registry, so adding a kind is adding a module."""
