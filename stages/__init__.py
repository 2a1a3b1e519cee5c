"""DVC stage entry points: read params.yaml, call the library, write the stage's outputs.

Data flow: prepare -> models -> cache_teacher (Stage 1, writes the store) -> train (Stage 2,
reads the store) -> evaluate -> report.
"""
