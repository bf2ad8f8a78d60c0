"""The lmms-eval model `casa`: any casa_hf checkpoint folder or built-in name, evaluated by lmms-eval.

    python -m lmms_eval --model casa --model_args pretrained=FOLDER_OR_NAME --tasks ... \
        --include_path "$(python -m casa_hf.evaluation)"   # the casa_synthetic_* tasks (docs/evaluation.md)

Registered through the entry point group `lmms_eval.models` (`casa_hf.evaluation.lmms_manifest`, `pyproject.toml`;
the `casa-hf[eval]` extra).

- `generate_until`: each request's images (`doc_to_visual`: PIL images, image files, video files as `max_frames`
  frames sampled evenly) and its text go through the processor's chat template as one user turn. Text holding
  `<image>` placeholders (one per image) puts each image at its place; otherwise the images come first, then the text,
  as lmms-eval's image tasks expect. `gen_kwargs`: `max_new_tokens`, `until` (the answer is cut before the first stop
  string), `temperature` (> 0 samples, 0 is greedy), `do_sample`, `top_p`, `top_k`, `num_beams`. Requests are
  batched (`batch_size`) with left padding, as `casa-hf evaluate` batches them.
- `loglikelihood`: minus the sum of the log-probabilities of the continuation's tokens after the templated prompt
  (with its images; lmms-eval takes a loss, lower is likelier), and whether greedy decoding would produce them:
  lmms-eval's multiple-choice tasks. One request at a time.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from ..builtin_models import questions_for, resolve_model
from ..image_inputs import load_image_input
from ..training.collator import CasaDataCollator
from ..training.synthetic_vqa import SYSTEM_TEXT
from . import synthetic_tasks

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
GENERATION_KEYS = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams", "until")
DEFAULT_MAX_NEW_TOKENS = 128


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class Casa(lmms):
    """`pretrained`: a checkpoint folder or built-in name (`tiny`, `casa-smollm2`). `questions`: which
    `casa_synthetic_*` questions the model is asked (`synthetic` one-word or `natural` English; default: what `casa-hf
    evaluate` asks it). `system_prompt`: a system message before every request (default: the one `casa-hf train`'s
    word-level models were trained with, none for others; `none` for none). `max_frames`: frames taken from a video
    file. `dtype`: `float32` (default), `bfloat16`, `float16`. `attn_implementation`: a Transformers backend."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "tiny",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,
        dtype: str = "float32",
        questions: str | None = None,
        system_prompt: str | None = None,
        max_frames: int | str = 8,
        attn_implementation: str | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(f"casa model: unknown model_args {sorted(unknown)}")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import casa_hf  # noqa: F401  (registers CASA with the Auto classes)

        path = resolve_model(pretrained)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(batch_size).startswith("auto"):
            raise ValueError("casa model: batch_size=auto is not supported; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"casa model: dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        options = {"dtype": getattr(torch, dtype)}
        if attn_implementation:
            options["attn_implementation"] = attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(path, **options).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.device = torch.device(device)
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        self.word_level = backend is not None and type(backend.model).__name__ == "WordLevel"
        self.max_frames = int(max_frames)
        self.questions = questions or questions_for(pretrained)
        if system_prompt is None:  # one-word questions come with the system message they were trained with
            system_prompt = SYSTEM_TEXT if self.questions == "synthetic" else ""
        self.system_prompt = "" if system_prompt.lower() == "none" else self._resolve_system_prompt(system_prompt)
        # token insertion baselines (`casa-hf train --kind insertion`) take one token per image feature
        self.collator = CasaDataCollator(self.processor, expand_image_tokens=self.model.config.model_type != "casa")
        synthetic_tasks.configure(self.questions, getattr(self.processor, "image_size", None))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # --- inputs ------------------------------------------------------------------------------------------------

    def _images(self, visuals) -> list[Image.Image]:
        """`doc_to_visual`'s output as a flat list of RGB images (video files as evenly sampled frames)."""
        images = []
        for item in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if item is None:
                continue
            if isinstance(item, (list, tuple)):
                images += self._images(item)
            elif isinstance(item, (str, Path)) and str(item).lower().endswith(VIDEO_SUFFIXES):
                images += self._video_frames(str(item))
            elif isinstance(item, dict):
                raise ValueError(f"casa model: audio and other non-image inputs are not supported ({sorted(item)})")
            else:
                image = load_image_input(item)
                images.append(image.convert("RGB") if isinstance(image, Image.Image) else image)
        return images

    def _video_frames(self, path: str) -> list[Image.Image]:
        from ..video import read_video_frames

        frames = list(read_video_frames(path))
        if not frames:
            raise ValueError(f"casa model: video {path} has no frames")
        keep = np.linspace(0, len(frames) - 1, min(self.max_frames, len(frames))).round().astype(int)
        return [frames[i].convert("RGB") for i in dict.fromkeys(keep.tolist())]

    def messages(self, context: str, images: list) -> list[dict]:
        """One user turn: the images at their `<image>` placeholders in `context`, or first when it holds none."""
        placeholder = synthetic_tasks.IMAGE_PLACEHOLDER
        pieces = context.split(placeholder)
        if len(pieces) > 1:
            if len(pieces) - 1 != len(images):
                raise ValueError(
                    f"casa model: the text holds {len(pieces) - 1} {placeholder} placeholder(s) for {len(images)} "
                    "image(s)"
                )
            content = []
            for index, piece in enumerate(pieces):
                if index:
                    content.append({"type": "image", "image": images[index - 1]})
                if piece:
                    content.append({"type": "text", "text": piece})
        else:
            content = [{"type": "image", "image": image} for image in images]
            content.append({"type": "text", "text": context})
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": content}]

    def _request_inputs(self, request_args) -> tuple[str, list]:
        context, _, doc_to_visual, doc_id, task, split = request_args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return context, self._images(visuals or [])

    # --- generation --------------------------------------------------------------------------------------------

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen_kwargs = copy.deepcopy(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))}
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        sample = _flag(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        options["do_sample"] = sample
        if sample:
            options["temperature"] = temperature
            for key in ("top_p", "top_k"):
                if gen_kwargs.get(key) is not None:
                    options[key] = type(1.0 if key == "top_p" else 1)(gen_kwargs[key])
        if gen_kwargs.get("num_beams") is not None:
            options["num_beams"] = int(gen_kwargs["num_beams"])
        return options, until

    @torch.no_grad()
    def _generate(self, conversations: list[list[dict]], options: dict) -> list[str]:
        """Answers to a batch of conversations, left-padded as `training.train.generate_answers` does."""
        prompts = [self.collator.encode_prompt(messages) for messages in conversations]
        width = max(len(ids) for ids, _, _ in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in prompts])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in prompts])
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        pixels = [p for _, p, _ in prompts if p is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([g for _, _, g in prompts if g is not None]).to(self.device)
        out = self.model.generate(**inputs, **options)
        return [self.decode(row) for row in out[:, width:].tolist()]

    def decode(self, ids: list[int]) -> str:
        """Generated ids as text (special tokens left out); a word-level tokenizer's (`casa-hf train`'s) as its
        words separated by spaces, which its own decoding runs together."""
        if self.word_level:
            return " ".join(self.tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation options batch together
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items())), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for indices in groups.values():
            options, until = self._generation_options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                conversations = [self.messages(*self._request_inputs(requests[i].args)) for i in chunk]
                for i, text in zip(chunk, self._generate(conversations, options), strict=True):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                progress.update(len(chunk))
        progress.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("casa model: multi-round generation is not supported; use generate_until tasks")

    # --- scoring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each request's `(negative log-likelihood of the continuation, greedy)`. lmms-eval's convention: the first
        value is a loss, lower is likelier (its multiple-choice scoring takes the argmin; here the loss is summed
        over the continuation's tokens). Wrapped in a `GenerationResult`: lmms-eval 0.7.3's evaluator turns any other
        tuple into its string (`unwrap_generation_output`), which breaks every multiple-choice task; the wrapper's
        `text` reaches the task as the tuple itself."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Scoring"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args[:6]
            if not isinstance(continuation, str):  # a `doc_to_target` function
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            ids, pixels, grid = self.collator.encode_prompt(self.messages(context, self._images(visuals or [])))
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not target:
                raise ValueError(f"casa model: the continuation {continuation!r} has no tokens")
            inputs = {"input_ids": torch.tensor([ids + target], device=self.device)}
            if pixels is not None:
                inputs["pixel_values"] = pixels.to(self.device, self.model.dtype)
                inputs["image_grid_thw"] = grid.to(self.device)
            logits = self.model(**inputs).logits[0, len(ids) - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            target_ids = torch.tensor(target, device=self.device)
            loss = -float(logprobs.gather(-1, target_ids[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target_ids).all())
            results.append(GenerationResult(text=(loss, greedy)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (loss, greedy))
        return results


__all__ = ["Casa"]
