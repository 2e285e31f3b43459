"""Human-readable views: adapter diffs and lineage rendering."""
