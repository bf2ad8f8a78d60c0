"""vLLM's scheduler never ends a prompt chunk between the images of one CASA window.

With `casa_window_images="consecutive"`, images separated only by vision start / end tokens share one window: the
text after them, and the markers between them, attend to all of them. A chunk ending between two of them would
compute the first image's markers without the second image, which casa_hf refuses (`build_casa_windows`). vLLM cuts
prompts at `max_num_batched_tokens` and at its encoder budget; for a CASA model with such windows the cut moves back
to the first placeholder of the run it would split, so that the run's images arrive in one step (a run that starts
the chunk is left as it is: it cannot move back, and the model then refuses the split by name).
"""

from __future__ import annotations

from itertools import pairwise

from ..configuration_casa import CasaConfig


def image_runs(prompt_ids: list[int], placeholders: list[int], markers: frozenset[int]) -> list[tuple[int, int]]:
    """(first, last) placeholder of each run of images: placeholders with only marker tokens between them."""
    runs: list[list[int]] = []
    for previous, following in pairwise([None, *placeholders]):
        joined = previous is not None and all(token in markers for token in prompt_ids[previous + 1 : following])
        if joined:
            runs[-1][1] = following
        else:
            runs.append([following, following])
    return [(first, last) for first, last in runs]


def whole_runs_count(start: int, count: int, runs: list[tuple[int, int]]) -> int:
    """Tokens to schedule from `start` (at most `count`) so that no run of images is split: a chunk ending after a
    run's first placeholder and at or before its last ends instead before the run."""
    end = start + count
    for first, last in runs:
        if first < end <= last and first > start:
            return first - start
    return count


def window_markers(config: object) -> frozenset[int] | None:
    """The marker tokens that join images into one window, for a CASA model with consecutive-image windows; None for
    any other model (nothing to keep together)."""
    if not isinstance(config, CasaConfig) or config.casa_window_images != "consecutive":
        return None
    return frozenset(config.vision_marker_ids)


def keep_image_runs_whole() -> None:
    """Wrap vLLM's `Scheduler._try_schedule_encoder_inputs` (its async scheduler inherits it), which sets how many
    tokens of a multimodal request a step computes, so that the count never splits a run of images."""
    from vllm.v1.core.sched.scheduler import Scheduler

    schedule = Scheduler._try_schedule_encoder_inputs
    if getattr(schedule, "keeps_casa_image_runs", False):
        return

    def try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        markers = window_markers(self.vllm_config.model_config.hf_config)
        if markers is None or not request.mm_features:
            return schedule(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs)
        placeholders = sorted(feature.mm_position.offset for feature in request.mm_features)
        runs = image_runs(request.prompt_token_ids, placeholders, markers)
        num_new_tokens = whole_runs_count(num_computed_tokens, num_new_tokens, runs)
        scheduled, count, *rest = schedule(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs)
        whole = whole_runs_count(num_computed_tokens, count, runs)
        if whole != count:  # the encoder budget cut inside a run: its images wait for the next step with it
            end = num_computed_tokens + whole
            scheduled = [i for i in scheduled if request.mm_features[i].mm_position.offset < end]
        return (scheduled, whole, *rest)

    try_schedule_encoder_inputs.keeps_casa_image_runs = True
    Scheduler._try_schedule_encoder_inputs = try_schedule_encoder_inputs


__all__ = ["image_runs", "keep_image_runs_whole", "whole_runs_count", "window_markers"]
