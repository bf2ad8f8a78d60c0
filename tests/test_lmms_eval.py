"""The lmms-eval model `casa` and the `casa_synthetic_*` tasks, through lmms-eval's own CLI in its own environment.

lmms-eval lives in a virtual environment of its own (`scripts/setup_lmms_eval.sh`; `.ci/run` creates it and names
its Python in `CASA_LMMS_PYTHON`). The CLI runs with this checkout's `src` first on its path, so it tests this code.
Its exit status says nothing unless `--verbosity DEBUG` (it exits 0 after an error otherwise): every run here is
DEBUG and also must have written its results file, holding every task asked for with the documents expected.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from casa_hf.builtin_models import resolve_model
from casa_hf.cli import main as casa_hf_main
from casa_hf.evaluation import LMMS_TASKS
from casa_hf.training.collator import CasaDataCollator
from casa_hf.training.synthetic_vqa import COLOURS, SINGLE_KINDS

ROOT = Path(__file__).resolve().parents[1]
LMMS_PYTHON = Path(os.environ.get("CASA_LMMS_PYTHON", ROOT / ".venv-lmms" / "bin" / "python"))
KINDS = (*SINGLE_KINDS, "change")
TINY_LIMIT = 10  # questions per kind: those of `casa-hf evaluate --examples 70` (7 kinds)


def lmms_python() -> Path:
    if not LMMS_PYTHON.is_file():
        pytest.fail(
            f"No lmms-eval environment at {LMMS_PYTHON}: create it with `bash scripts/setup_lmms_eval.sh .venv-lmms` "
            "(about 2-4 minutes), or point CASA_LMMS_PYTHON at the Python of one made by that script",
            pytrace=False,
        )
    return LMMS_PYTHON


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_lmms(
    output: Path, model_args: str, tasks: list[str], limit: int, *extra: str, include: Path = LMMS_TASKS, local=()
) -> dict:
    """`python -m lmms_eval --model casa ...` with the tasks in `include` (the casa tasks); the results file's content
    plus each task's logged samples (`samples[task]`, in document order). Fails unless the run wrote results for
    every task, `limit` documents each (`local` tasks: `LOCAL_QUESTIONS`)."""
    command = [
        str(lmms_python()), "-m", "lmms_eval", "--model", "casa", "--model_args", model_args,
        "--tasks", ",".join([*tasks, *local]), "--include_path", str(include), "--limit", str(limit),
        "--output_path", str(output), "--log_samples", "--verbosity", "DEBUG", *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, cwd=output.parent)
    log = f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.returncode == 0, log
    found = sorted(output.glob("*/*_results.json"))
    assert len(found) == 1, f"no results file written:\n{log}"
    results = json.loads(found[0].read_text())
    results["samples"] = {}
    for task in [*tasks, *local]:
        expected = LOCAL_QUESTIONS if task in local else limit
        assert results["n-samples"][task]["effective"] == expected, (task, results["n-samples"])
        (samples,) = found[0].parent.glob(f"*_samples_{task}.jsonl")
        lines = [json.loads(line) for line in samples.read_text().splitlines()]
        results["samples"][task] = sorted(lines, key=lambda sample: sample["doc_id"])
    results["log"] = log
    return results


def _answer(sample: dict) -> str:
    """A generated answer as logged (the text, or a one-item list of it)."""
    answer = sample["filtered_resps"]
    return answer if isinstance(answer, str) else answer[0]


LOCAL_TASK = """
task: local_colour
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function local_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["."]
process_results: !function local_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
LOCAL_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def process_results(doc, results):
    words = results[0].split()
    return {"accuracy": float(bool(words) and words[0] == doc["answer"])}
"""
LOCAL_QUESTIONS = 6


def _local_task(folder: Path) -> None:
    """An image-question task in lmms-eval's own format, as a user writes one: image files and a JSON-lines file
    naming them, a YAML task (`dataset_path: json`) and its functions."""
    import numpy as np

    from casa_hf.training.synthetic_vqa import SYSTEM_TEXT, random_scene, render

    assert SYSTEM_TEXT == "answer with one word ."  # the casa model's default system message for the tiny model
    rng = np.random.default_rng(7)
    lines = []
    for i in range(LOCAL_QUESTIONS):
        scene = random_scene(rng, count=1)
        render(scene, 112, rng).save(folder / f"image{i}.png")
        lines.append(
            {"image": str(folder / f"image{i}.png"), "question": "what colour is the shape ?", "answer": scene.colour}
        )
    (folder / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "local_colour.yaml").write_text(LOCAL_TASK.format(questions=folder / "questions.jsonl"))
    (folder / "local_utils.py").write_text(LOCAL_UTILS)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny model on every kind's questions, two multiple-choice tasks and a local task in lmms-eval's format,
    in one lmms-eval run. The casa tasks are copied next to the local one (their data does not depend on where their
    files are)."""
    tasks_folder = tmp_path_factory.mktemp("tasks") / "tasks"
    shutil.copytree(LMMS_TASKS, tasks_folder)
    _local_task(tasks_folder)
    tasks = [f"casa_synthetic_{kind}" for kind in KINDS]
    tasks += ["casa_synthetic_choice_colour", "casa_synthetic_choice_change"]
    output = tmp_path_factory.mktemp("lmms") / "out"
    run = run_lmms(
        output, "pretrained=tiny", tasks, TINY_LIMIT, "--batch_size", "8", include=tasks_folder, local=["local_colour"]
    )
    run["local_folder"] = tasks_folder
    return run


def test_tiny_model_scores_what_casa_hf_evaluate_scores(tiny_run, capsys):
    """Per kind, lmms-eval's accuracy is `casa-hf evaluate`'s on the same questions (the first 10 of each kind are
    those of `--examples 70`), exactly; the tiny model's one-word answers are graded by their first word."""
    casa_hf_main(["evaluate", "--model", "tiny", "--examples", str(TINY_LIMIT * len(KINDS))])
    expected = json.loads(capsys.readouterr().out)
    measured = {kind: tiny_run["results"][f"casa_synthetic_{kind}"]["accuracy,none"] for kind in KINDS}
    assert measured == {kind: expected[kind] for kind in KINDS}
    assert 0 < measured["change"] < 1  # a question it sometimes gets wrong: the comparison is not all ones
    answers = [_answer(sample) for sample in tiny_run["samples"]["casa_synthetic_colour"]]
    assert all(answer.split()[0] in COLOURS for answer in answers), answers


def test_two_images_reach_the_model_in_place(tiny_run):
    """The two-frame question puts each frame at its place in the user turn, the text between them kept."""
    for sample in tiny_run["samples"]["casa_synthetic_change"]:
        assert sample["input"] == "<image>first frame .<image>what changed between the frames ?"
        assert sample["target"] in ("colour", "shape", "position")


def _reference_losses(kind: str, limit: int) -> list[list[float]]:
    """Minus the log-probability of each choice word as the tiny model's first answer token, computed here with
    Transformers on the same held-out questions (system prompt, user turn, generation prompt)."""
    from casa_hf.evaluation.synthetic_tasks import choices, configure, documents, example

    path = resolve_model("tiny")
    model, processor = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    configure("synthetic", processor.image_size)
    collator = CasaDataCollator(processor)
    losses = []
    for doc in documents(kind)[:limit]:
        ids, pixels, grid = collator.encode_prompt(example(doc)["messages"][:-1])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grid).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), -1)
        words = processor.tokenizer.convert_tokens_to_ids(choices(doc))
        losses.append([-float(logprobs[word]) for word in words])
    return losses


@pytest.mark.parametrize("kind", ["colour", "change"])
def test_multiple_choice_scores_each_answer_by_its_likelihood(tiny_run, kind):
    """`loglikelihood`: each choice's loss is minus its log-probability after the prompt and images, as computed
    here; the task's accuracy is the share of questions whose likeliest choice is the answer."""
    samples = tiny_run["samples"][f"casa_synthetic_choice_{kind}"]
    reference = _reference_losses(kind, TINY_LIMIT)
    logged = [[float(loss) for loss, _ in sample["filtered_resps"]] for sample in samples]
    assert [len(row) for row in logged] == [len(row) for row in reference]
    assert sum(logged, []) == pytest.approx(sum(reference, []), abs=1e-4)
    right = [
        min(range(len(row)), key=row.__getitem__) == int(sample["target"])
        for row, sample in zip(reference, samples, strict=True)
    ]
    assert tiny_run["results"][f"casa_synthetic_choice_{kind}"]["acc,none"] == pytest.approx(sum(right) / len(right))


def test_a_model_that_fails_to_load_fails_the_run(tmp_path):
    """A folder that is no checkpoint stops the run with casa_hf's message (not a green run with exit status 0)."""
    with pytest.raises(AssertionError) as failure:
        run_lmms(tmp_path / "out", f"pretrained={tmp_path / 'missing'}", ["casa_synthetic_colour"], 2)
    assert "is neither a built-in model" in str(failure.value)
    assert not list((tmp_path / "out").glob("*/*_results.json"))


ADAPTER_CHECK = r"""
import json, sys

import av
import numpy as np
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from casa_hf.evaluation.lmms_model import Casa

video = sys.argv[1]
with av.open(video, "w") as container:  # 12 frames, frame i of grey level 20 * i
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    for i in range(12):
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
model = Casa(pretrained="tiny", max_frames="4")
torch.manual_seed(0)  # the sampled answer
report = {"grey_levels": [round(float(np.asarray(frame).mean()) / 20) for frame in model._images([video])]}
red = Image.new("RGB", (112, 112), (20, 20, 30))
red.paste((220, 40, 40), (20, 20, 60, 60))
report["content"] = [part["type"] for part in model.messages("what colour is the shape ?", [red, red])[-1]["content"]]
try:
    model.messages("<image>what colour is the shape ?", [red, red])
except ValueError as error:
    report["refused"] = str(error)
model.task_dict = {"t": {"test": [{"visual": [red]}, {"visual": [red]}, {"visual": [red]}, {"visual": [video]}]}}
options = [{"until": ["."]}, {"until": []}, {"temperature": 0.7}, {}]
requests = [
    Instance(
        "generate_until",
        ("what colour is the shape ?", {"max_new_tokens": 4, **gen}, lambda doc: doc["visual"], i, "t", "test"),
        0,
        metadata={"task": "t", "doc_id": i, "repeats": 1},
    )
    for i, gen in enumerate(options)
]
report["answers"] = model.generate_until(requests)
print(json.dumps(report))
"""


def test_adapter_inputs_video_frames_and_generation_options(tmp_path):
    """A video file becomes `max_frames` evenly sampled frames; images without `<image>` placeholders come before the
    text, a placeholder count that does not match the images is refused; `until` cuts the answer at a stop string,
    and a temperature samples (requests with different options are answered in separate batches)."""
    done = subprocess.run(
        [str(lmms_python()), "-c", ADAPTER_CHECK, str(tmp_path / "frames.mp4")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["grey_levels"] == [0, 4, 7, 11]
    assert report["content"] == ["image", "image", "text"]
    assert "holds 1 <image> placeholder(s) for 2 image(s)" in report["refused"]
    stopped, full, sampled, video = report["answers"]
    assert (stopped, full) == ("red ", "red .")
    assert sampled and video.endswith(" .")  # the stream's last frame (grey 220) answered like an image


def test_a_local_task_in_lmms_evals_format_runs(tiny_run):
    """Any image-question task in lmms-eval's own format (images named in a JSON file) runs on a casa_hf model: its
    answers are the tiny model's own to those images and question (asked here through `casa-hf evaluate`'s
    generation, with the system message the casa model adds)."""
    from PIL import Image

    from casa_hf.training.synthetic_vqa import SYSTEM_TEXT
    from casa_hf.training.train import generate_answers

    samples = tiny_run["samples"]["local_colour"]
    assert [sample["input"] for sample in samples] == ["what colour is the shape ?"] * LOCAL_QUESTIONS
    path = resolve_model("tiny")
    model, processor = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    examples = []
    for i in range(LOCAL_QUESTIONS):
        image = Image.open(tiny_run["local_folder"] / f"image{i}.png").convert("RGB")
        user = [{"type": "image", "image": image}, {"type": "text", "text": "what colour is the shape ?"}]
        messages = [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": user}]
        examples.append({"messages": [*messages, {"role": "assistant", "content": ""}]})
    with torch.no_grad():
        ids = generate_answers(model, processor, CasaDataCollator(processor), examples, max_new_tokens=1)[:, 0]
    expected = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert [_answer(sample).split()[0] for sample in samples] == expected
    right = [word == sample["target"] for word, sample in zip(expected, samples, strict=True)]
    assert tiny_run["results"]["local_colour"]["accuracy,none"] == pytest.approx(sum(right) / len(right))
    assert sum(right) >= LOCAL_QUESTIONS - 2  # it sees the shapes' colours


def test_without_the_lmms_eval_environment_the_tests_fail_and_say_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "LMMS_PYTHON", tmp_path / "missing" / "bin" / "python")
    with pytest.raises(pytest.fail.Exception, match="bash scripts/setup_lmms_eval.sh .venv-lmms"):
        lmms_python()
    script = (ROOT / ".ci" / "run").read_text()  # CI makes it before the tests, where they look by default
    assert "bash scripts/setup_lmms_eval.sh .venv-lmms --system-site-packages" in script
    assert script.index("setup_lmms_eval.sh") < script.index("python -m pytest tests")
    assert "/.venv-lmms/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow  # the real SmolLM2
def test_casa_smollm2_scores_what_casa_hf_evaluate_scores(tmp_path):
    """CASA-SmolLM2 is asked `casa-hf evaluate`'s English held-out phrasings (its `questions`), graded by the answer
    word of its sentences: lmms-eval's accuracy per kind is that of `casa-hf evaluate --examples 64`'s held-out
    phrasings row on the same questions (computed here by the function behind that row, on those kinds only)."""
    from casa_hf.smollm2.train import EVALUATED_KINDS, evaluate_natural, held_out_natural

    kinds, limit = ("colour", "change"), 8
    run = run_lmms(
        tmp_path / "out", "pretrained=casa-smollm2", [f"casa_synthetic_{kind}" for kind in kinds], limit,
        "--batch_size", "8",
    )  # fmt: skip
    path = resolve_model("casa-smollm2")
    model, processor = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    held_out = held_out_natural(limit * len(EVALUATED_KINDS), processor.image_size, "held_out", 0, EVALUATED_KINDS)
    asked = [held_out[i] for i in range(len(held_out)) if held_out[i]["kind"] in kinds]
    expected = evaluate_natural(model, processor, asked)
    measured = {kind: run["results"][f"casa_synthetic_{kind}"]["accuracy,none"] for kind in kinds}
    assert measured == {kind: expected[kind] for kind in kinds}
    questions = [example["question"] for example in asked if example["kind"] == "colour"]
    assert [sample["input"].removeprefix("<image>") for sample in run["samples"]["casa_synthetic_colour"]] == questions
