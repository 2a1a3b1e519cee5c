"""DVC stage entry points: read params.yaml, call the library, write the stage's outputs.

Data flow: prepare -> models -> cache_teacher and cache_heldout (Stage 1, write the store) ->
train (Stage 2, reads the store) -> fidelity and evaluate -> report; beside them
template_analysis (Stage 1 per template) and teacher_generate (SeqKD's teacher responses).
"""
