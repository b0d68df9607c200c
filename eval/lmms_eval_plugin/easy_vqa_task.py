"""The packaged lmms-eval tasks on easy-VQA's test split, read offline from the ``easy-vqa`` package
(no dataset hub): the YAMLs in ``tasks/defocus_easy_vqa/`` name :class:`EasyVQATask` as their class
and the functions below for prompts, images, targets and scores."""

from __future__ import annotations

from pathlib import Path

from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from defocus_vlm.data.vqa import VQASample, build_prompt, read_benchmark

from ..vqa_metrics import exact_match


class EasyVQATask(ConfigurableTask):
    """A YAML-configured task whose documents come from the installed easy-VQA package (a subclass sets
    another ``benchmark`` of :mod:`~defocus_vlm.data.vqa` and where its files are)."""

    benchmark = "easy-vqa"

    def __init__(self, config: dict) -> None:
        # lmms-eval hands python tasks their whole YAML, "class" included, which TaskConfig does not know
        super().__init__(config={k: v for k, v in config.items() if k != "class"})

    def data_path(self) -> Path | None:
        """The benchmark's files (None: easy-VQA reads the installed package)."""
        return None

    def download(self, dataset_kwargs: dict | None = None) -> None:
        import datasets

        split = self.config.test_split
        rows = [
            {"question_id": s.question_id, "question": s.question, "answer": s.answers[0], "image_path": str(s.image),
             **dict(s.tags)}  # shapes-VQA: type, region, combination, kept in the logged samples
            for s in read_benchmark(self.benchmark, self.data_path(), split)
        ]  # fmt: skip
        self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
        self.dataset_no_image = self.dataset  # images are loaded from paths by doc_to_visual


def _sample(doc: dict) -> VQASample:
    return VQASample(doc["question_id"], doc["question"], Path(doc["image_path"]), (doc["answer"],))


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [_sample(doc).load_image()]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return build_prompt(_sample(doc))


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    import easy_vqa

    return easy_vqa.get_answers()


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
