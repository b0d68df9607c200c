"""lmms-eval model ``defocus_vlm``: an exported De-focus vision-language model behind lmms-eval's
``generate_until`` (batched greedy answers) and ``loglikelihood`` (multiple choice) requests.

``--model_args pretrained=DIR[,dtype=float32,max_new_tokens=16]``; ``--device`` and ``--batch_size``
come from lmms-eval's own options."""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from defocus_vlm.inference import VLMAnswerer


def _loglikelihood_response(value: float, is_greedy: bool):
    """``(value, is_greedy)`` in a form that reaches the task's scoring intact.

    lmms-eval 0.7's evaluator passes each response through ``unwrap_generation_output``, which turns
    anything but a string or a ``GenerationResult`` into its ``str()``, so the pair arrives as the text
    "(12.3, False)" and multiple-choice scoring fails. A ``GenerationResult`` is passed on unchanged,
    so there the pair travels inside one; versions without that conversion get the plain tuple."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return value, is_greedy
    if isinstance(unwrap_generation_output((value, is_greedy))[0], tuple):
        return value, is_greedy
    return GenerationResult(text=(value, is_greedy))


class DefocusVLM(lmms):
    """``lmms-eval --model defocus_vlm --model_args pretrained=DIR``: see the module docstring."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 16,
        max_batch_size: int | str | None = None,
    ) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval passes it to every model; batches here have a fixed size
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"defocus_vlm needs a positive integer batch size, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.answerer = VLMAnswerer(pretrained, device=device, dtype=dtype, max_new_tokens=int(max_new_tokens))

    def _image(self, doc_to_visual, doc_id: int, task: str, split: str):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(f"defocus_vlm takes one image per question; {task} doc {doc_id} has {len(visuals)}")
        return visuals[0].convert("RGB")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=self.rank != 0, desc="defocus_vlm"):
            chunk = requests[start : start + self.batch_size]
            batch, stops, limits = [], [], []
            for request in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                batch.append((self._image(doc_to_visual, doc_id, task, split), context))
                until = gen_kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
                limits.append(int(gen_kwargs.get("max_new_tokens", self.answerer.max_new_tokens)))
            # one generation length per batch (the largest asked for); stop strings then cut each answer
            for text, until in zip(self.answerer(batch, max_new_tokens=max(limits)), stops):
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers.append(text.strip())
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list:
        # lmms-eval ranks multiple-choice options by argmin, as its models return a loss: so this returns
        # the negative log-likelihood of the continuation (summed over its tokens).
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="defocus_vlm"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            # the option is the assistant's whole reply: lmms-eval's target delimiter (a space) is for plain LMs
            continuation = continuation.lstrip()
            image = self._image(doc_to_visual, doc_id, task, split)
            logprob, is_greedy = self.answerer.continuation_logprob(image, context, continuation)
            results.append(_loglikelihood_response(-logprob, is_greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("defocus_vlm answers single-turn questions only")
