"""Data for every stage and for evaluation, read in one place: classification sources
(:mod:`.classification`), image-text pairs (:mod:`.pairs`), LLaVA conversations (:mod:`.llava`), VQA
benchmark readers (:mod:`.vqa`) and the shapes-VQA generator (:mod:`.shapes_vqa`). Training,
evaluation and the CLI import from here; this package imports only the model layer below it (never
``defocus_vlm.training``, ``defocus_vlm.eval`` or ``defocus_vlm.commands``)."""
