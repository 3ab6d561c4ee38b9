"""seqpar.export: training checkpoints to Hugging Face folders and back.

- ``python -m seqpar.export.hf CHECKPOINT OUT_DIR`` (``seqpar-export``): :func:`seqpar.export.hf.export`.
- ``python -m seqpar.export.from_hf HF_DIR OUT_RUN`` (``seqpar-import``): a Llama-architecture HF
  model to a seqpar checkpoint that training resumes from.
- :func:`seqpar.export.reader.read_checkpoint`: full tensors of any saved layout, one process.
"""

from seqpar.export.reader import ExportError, read_checkpoint, resolve_step_dir

__all__ = ["ExportError", "read_checkpoint", "resolve_step_dir"]
