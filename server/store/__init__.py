"""Adapters on disk and in host memory.

- names.py              strict adapter names (the only request-derived path components)
- layout.py             the store folder: entry layout, durable renames, start-up recovery, pins file
- manifest.py           manifest.json: what an adapter is, sha256 and size of each file; re-hash a folder
- lookup.py             StoreIndex: what is served, resolving a name, listing, steady reads and loads
- upload.py             uploads: staging in a private folder, validation, atomic publish
- versions.py           the on-disk record of each name's highest version, so versions never repeat
- store.py              AdapterStore: the facade over the modules above; delete
- registry.py           AdapterRegistry: host-RAM LRU by bytes, pinning, single-flight loads (AdapterProvider)

Nothing is imported here so that importing one module stays cheap.
"""
