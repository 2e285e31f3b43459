"""Test helpers shipped with the package (a local Hub server, tiny random models); no pytest at import."""
