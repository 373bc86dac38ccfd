"""Data loading, templates, partitioning and the demo's generated skills."""
