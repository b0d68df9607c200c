"""Data sources shared by training, evaluation and the CLI (generators and exporters of data sets).

Layering: modules here may use torch, NumPy, PIL and the model-level constants of ``defocus_vlm``,
never ``defocus_vlm.training``, ``defocus_vlm.eval`` or ``defocus_vlm.commands`` (those import this)."""
