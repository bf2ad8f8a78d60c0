"""The rule casa_hf's vLLM plugin adds to vLLM's scheduler (`casa_hf.vllm.scheduling`): a prompt chunk never ends
between the images of one window. Pure functions, run here without vLLM; test_vllm.py runs them inside vLLM."""

from tiny import IMAGE_TOKEN, tiny_config

from casa_hf.vllm.scheduling import image_runs, whole_runs_count, window_markers

START, END = 151, 152  # tiny_config's vision start / end tokens
MARKERS = frozenset({START, END})


def test_images_with_only_markers_between_form_one_run():
    prompt = [3, START, IMAGE_TOKEN, END, START, IMAGE_TOKEN, END, 9, 9, START, IMAGE_TOKEN, END, 9, IMAGE_TOKEN]
    assert image_runs(prompt, [2, 5, 10, 13], MARKERS) == [(2, 5), (10, 10), (13, 13)]
    assert image_runs(prompt, [2, 5, 10, 13], frozenset()) == [(2, 2), (5, 5), (10, 10), (13, 13)]
    assert image_runs([IMAGE_TOKEN, IMAGE_TOKEN], [0, 1], MARKERS) == [(0, 1)]  # adjacent placeholders


def test_a_chunk_ending_inside_a_run_ends_before_it():
    runs = [(2, 5), (10, 10)]
    assert whole_runs_count(0, 4, runs) == 2  # [0, 4) holds the run's first image, not its second: stop at 2
    assert whole_runs_count(0, 5, runs) == 2  # ends right before the second image
    assert whole_runs_count(0, 6, runs) == 6  # the whole run
    assert whole_runs_count(0, 2, runs) == 2  # ends before the run
    assert whole_runs_count(3, 2, runs) == 2  # starts inside a run (not made here): nothing to move back to
    assert whole_runs_count(2, 2, runs) == 2  # the run starts the chunk: it cannot move back (the model refuses)
    assert whole_runs_count(6, 5, runs) == 5  # a one-image run is never split


def test_only_consecutive_windows_keep_runs():
    assert window_markers(tiny_config()) == MARKERS  # new configs: windows of consecutive images
    assert window_markers(tiny_config(casa_window_images="each")) is None
    assert window_markers(object()) is None  # another model on the same vLLM
