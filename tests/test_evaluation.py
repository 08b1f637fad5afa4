"""The evaluation harness end to end on a tiny saved model: one local benchmark folder per task format, next-token
scoring against an unbatched forward, interrupt-and-resume, clear errors on malformed data, the model-index block,
and the digits VQA check of contract 2. Budget: ~60 s."""

import json
import os
import shutil

import pytest
import torch
from huggingface_hub import EvalResult
from utils import digit_images, tiny_model

from ml_mamba.evaluation import (
    TASKS,
    TaskDataError,
    evaluate_model,
    get_task,
    load_examples,
    load_model,
    open_image,
)
from ml_mamba.evaluation.cli import run as cli_run
from ml_mamba.evaluation.runner import candidate_token_ids, user_prompt

ROWS = 6


def _rows(task: str, count: int = ROWS) -> list[dict]:
    """`count` rows of `task` in its documented local schema, image i being `images/d<i % 4>.png`."""
    rows = []
    for i in range(count):
        row = {"question_id": f"{task}-{i}", "image": f"images/d{i % 4}.png",
               "question": f"Which digit is shown{' here' * (i % 3)}?"}
        if task in ("vqav2", "textvqa", "vizwiz"):
            row["answers"] = [str(i % 4)] * 6 + ["unanswerable" if task == "vizwiz" else "one"] * 4
        if task == "vqav2":
            row["answer_type"] = "number" if i % 2 else "other"
        if task == "textvqa":
            row["ocr_tokens"] = ["STOP", f"{i}"]
        if task == "vizwiz":
            row["answerable"] = i % 2
        if task in ("gqa", "digits-vqa"):
            row["answer"] = str(i % 4)
        if task == "digits-vqa":
            row["question_type"] = "digit" if i % 2 else "parity"
        if task == "pope":
            row.update(answer="yes" if i % 2 else "no", category=["random", "popular", "adversarial"][i % 3])
        if task == "vsr":
            row = {"image": row["image"], "caption": f"The digit {i} is left of the border.", "label": i % 2}
        if task == "scienceqa-img":
            row.update(choices=["zero", "one", "two"][: 2 + i % 2], answer=i % 2, hint="A handwritten digit." * (i % 2))
        if task == "mme":
            row.update(question_id=f"img{i // 2}.png", question="Is this digit a seven? Please answer yes or no.",
                       answer="Yes" if i % 2 else "No", category="count" if i < 4 else "code_reasoning")
        rows.append(row)
    return rows


# The image tasks; the video task (video-digits) needs a model with video support: tests/test_video.py.
IMAGE_TASKS = tuple(name for name, task in TASKS.items() if task.media == "image")


def write_benchmark(folder, tasks=IMAGE_TASKS) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(digit_images(4)):
        image.save(folder / "images" / f"d{i}.png")
    for task in tasks:
        with open(folder / f"{task}.jsonl", "w") as file:
            for row in _rows(task):
                file.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny ML-Mamba saved Hub-style, whose greedy answers differ between images."""
    folder = tmp_path_factory.mktemp("model")
    model, processor = tiny_model("mlp", "mamba2", seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def loaded(saved_model):
    return load_model(saved_model)  # through AutoModelForImageTextToText / AutoProcessor


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    write_benchmark(folder)
    return folder


def _predictions(folder, task):
    return [json.loads(line) for line in (folder / task / "predictions.jsonl").read_text().splitlines()]


def test_every_task_scores_end_to_end_from_local_files(loaded, bench, tmp_path):
    model, processor = loaded
    out = tmp_path / "eval"
    results = evaluate_model(model, processor, list(IMAGE_TASKS), out, data={name: str(bench) for name in IMAGE_TASKS},
                             batch_size=4, max_new_tokens=3, task_options={"ocr": "before"}, progress=False)
    assert json.loads((out / "results.json").read_text()) == results
    expected_keys = {"vqav2": "accuracy", "textvqa": "accuracy", "vizwiz": "unanswerable_average_precision",
                     "gqa": "accuracy", "pope": "f1", "vsr": "yes_ratio", "scienceqa-img": "accuracy",
                     "mme": "perception_score", "digits-vqa": "accuracy_by_question_type"}
    for name, key in expected_keys.items():
        entry = results["results"][name]
        assert key in entry["metrics"], (name, entry["metrics"])
        assert entry["num_examples"] == ROWS
        records = _predictions(out, name)
        if name != "mme":  # (MME ids repeat, see below)
            assert [r["question_id"] for r in records] == [str(r.get("question_id", i)) for i, r in
                                                           enumerate(_rows(name))]
        if "accuracy" in entry["metrics"] and name not in ("pope", "vsr"):  # mean of per-question scores
            assert entry["metrics"]["accuracy"] == pytest.approx(sum(r["score"] for r in records) / ROWS)
    assert set(results["results"]["pope"]["metrics"]["by_group"]) == {"random", "popular", "adversarial"}
    # MME pairs the two questions of an image (ids repeat, so prediction keys get a suffix).
    assert [r["question_id"] for r in _predictions(out, "mme")][:2] == ["img0.png#0", "img0.png#1"]
    assert results["results"]["mme"]["metrics"]["by_category"]["count"]["images"] == 2

    prompts = {name: json.loads((out / name / "run_config.json").read_text())["example_prompt"] for name in IMAGE_TASKS}
    assert prompts["vqav2"].endswith("Which digit is shown?\nAnswer the question using a single word or phrase."
                                     "<|endoftext|>\n<|assistant|>\n")
    assert "<image>Reference OCR token: STOP, 0\nWhich digit is shown?\n" in prompts["textvqa"]
    assert "respond with 'Unanswerable'" in prompts["vizwiz"]
    assert 'is this statement "True" or "False"? The digit 0' in prompts["vsr"]
    assert "A. zero\nB. one\nAnswer with the option's letter from the given choices directly." in prompts[
        "scienceqa-img"]
    assert "Please answer yes or no" not in prompts["mme"]

    for entry in results["model_index"]:
        EvalResult(**entry)  # the keys huggingface_hub expects
    assert {e["metric_type"] for e in results["model_index"]} >= {"accuracy", "f1", "mme_perception"}


def test_next_token_scoring_matches_an_unbatched_forward(loaded, bench, tmp_path):
    """POPE's Yes/No probabilities in a left-padded batch equal those of each question alone."""
    model, processor = loaded
    task = get_task("pope")
    examples, _ = load_examples(task, str(bench))
    evaluate_model(model, processor, ["pope"], tmp_path, data={"pope": str(bench)}, batch_size=4, progress=False)
    records = _predictions(tmp_path, "pope")
    lengths = {len(processor.tokenizer(user_prompt(processor, task, e))["input_ids"]) for e in examples[:4]}
    assert len(lengths) > 1, "the first batch should need left padding"
    yes, no = candidate_token_ids(processor.tokenizer, ("Yes", "No"))
    for example, record in zip(examples, records):
        inputs = processor(images=[open_image(example.image)],
                           text=[user_prompt(processor, task, example)], return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**inputs).logits[0, -1], dim=-1)[[yes, no]]
        probs = (probs / probs.sum()).tolist()
        assert [record["probabilities"]["Yes"], record["probabilities"]["No"]] == pytest.approx(probs, abs=1e-5)
        assert record["prediction"] == ("Yes" if probs[0] >= probs[1] else "No")


def test_interrupted_run_resumes_to_the_same_files(loaded, bench, tmp_path, monkeypatch):
    model, processor = loaded
    kwargs = dict(data={"digits-vqa": str(bench), "pope": str(bench)}, batch_size=2, progress=False)
    full = evaluate_model(model, processor, ["digits-vqa", "pope"], tmp_path / "full", **kwargs)

    calls = {"n": 0}
    generate = model.generate

    def crashing_generate(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third batch of digits-vqa
        return generate(*args, **kw)

    monkeypatch.setattr(model, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, processor, ["digits-vqa", "pope"], tmp_path / "resumed", **kwargs)
    predictions = tmp_path / "resumed" / "digits-vqa" / "predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 4  # two batches saved
    with open(predictions, "a") as file:
        file.write('{"question_id": "digits-vqa-4", "predic')  # killed in the middle of writing a line

    calls["n"] = -100
    resumed = evaluate_model(model, processor, ["digits-vqa", "pope"], tmp_path / "resumed", **kwargs)
    assert calls["n"] == -100 + 1 + 3  # one batch of digits-vqa left, three of pope
    assert resumed == full
    for name in ("results.json", "digits-vqa/predictions.jsonl", "pope/predictions.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text(), name
    calls["n"] = -100
    evaluate_model(model, processor, ["digits-vqa"], tmp_path / "resumed", **kwargs | {"data": {
        "digits-vqa": str(bench)}})
    assert calls["n"] == -100  # everything already predicted: nothing is generated again

    with pytest.raises(RuntimeError, match="max_new_tokens"):  # another configuration must not mix in
        evaluate_model(model, processor, ["digits-vqa"], tmp_path / "resumed", data={"digits-vqa": str(bench)},
                       max_new_tokens=2, progress=False)


def test_malformed_data_errors_name_the_row(loaded, bench, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(bench, folder)
    rows = _rows("vqav2")
    rows[2]["image"] = "images/missing.png"
    (folder / "vqav2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match=r"row 2 \(question_id 'vqav2-2'\) has image 'images/missing.png', "
                                            r"which does not exist"):
        load_examples(get_task("vqav2"), str(folder))

    rows = _rows("vqav2")
    del rows[3]["answers"]
    (folder / "vqav2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match=r"row 3 \(question_id 'vqav2-3'\) has no 'answers' field: vqav2 needs "
                                            r"the human answers"):
        load_examples(get_task("vqav2"), str(folder))

    rows = _rows("pope")
    rows[1]["image"] = None
    rows[4]["answer"] = "maybe"
    (folder / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match=r"row 1 \(question_id 'pope-1'\) has no image"):
        load_examples(get_task("pope"), str(folder))
    rows[1]["image"] = "images/d1.png"
    (folder / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match=r"row 4 \(question_id 'pope-4'\) has answer 'maybe'"):
        load_examples(get_task("pope"), str(folder))

    with pytest.raises(ValueError, match="Unknown task 'vqa3'; available tasks: vqav2, textvqa"):
        get_task("vqa3")
    with pytest.raises(ValueError, match="Unknown task 'vqa3'"):
        cli_run(["--model", "unused", "--tasks", "vqa3"])
    with pytest.raises(ValueError, match="has no Hub copy"):
        load_examples(get_task("digits-vqa"))
    with pytest.raises(ValueError, match="option ocr='middle'"):
        get_task("textvqa", ocr="middle")


def test_hub_layout_folder_parquet_images_and_limit(loaded, bench, tmp_path):
    """A dataset folder in the Hub layout (lmms-lab style: image bytes, answers as annotation dicts) reads through the
    same `datasets.load_dataset` path as the Hub; `limit` takes the first rows and says so in the model index."""
    import datasets

    rows = _rows("vqav2")
    images = [str(bench / r["image"]) for r in rows]
    table = {"question_id": [r["question_id"] for r in rows], "question": [r["question"] for r in rows],
             "answers": [[{"answer": a, "answer_id": k} for k, a in enumerate(r["answers"])] for r in rows],
             "image": images}
    folder = tmp_path / "VQAv2"
    (folder / "data").mkdir(parents=True)
    dataset = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    dataset.to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    examples, source = load_examples(get_task("vqav2"), str(folder), limit=4)
    assert source.kind == "hub-folder" and source.num_rows == ROWS and len(examples) == 4
    assert examples[0].target == rows[0]["answers"]
    model, processor = loaded
    results = evaluate_model(model, processor, ["vqav2"], tmp_path / "out", data={"vqav2": str(folder)}, limit=4,
                             max_new_tokens=2, progress=False)
    entry = results["model_index"][0]
    assert entry["dataset_name"].endswith("first 4 of 6 questions") and entry["dataset_split"] == "validation"


def test_hub_source_joins_gqa_images(monkeypatch):
    """The Hub code path (lmms-lab/GQA keeps images in a second config), with `datasets.load_dataset` served
    locally."""
    import datasets

    questions = datasets.Dataset.from_dict({"id": ["q1", "q2"], "imageId": ["n2", "n1"], "question": ["a?", "b?"],
                                            "answer": ["yes", "no"]})
    images = datasets.Dataset.from_dict({"id": ["n1", "n2"], "image": digit_images(2)}).cast_column(
        "image", datasets.Image())
    requested = []

    def fake_load_dataset(repo, config=None, split=None, **kwargs):
        requested.append((repo, config, split))
        return {"testdev_balanced_instructions": questions, "testdev_balanced_images": images}[config]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, source = load_examples(get_task("gqa"))
    assert requested == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
                         ("lmms-lab/GQA", "testdev_balanced_images", "testdev")]
    assert [e.question_id for e in examples] == ["q1", "q2"] and source.describe()["config"] == (
        "testdev_balanced_instructions")
    assert list(examples[0].image().getdata()) == list(digit_images(2)[1].getdata())  # q1 shows image n2


def test_model_index_goes_into_the_model_card(loaded, bench, saved_model, tmp_path):
    from ml_mamba.model_cards import save_model_card

    model, processor = loaded
    results = evaluate_model(model, processor, ["digits-vqa", "mme"], tmp_path / "eval",
                             data={"digits-vqa": str(bench), "mme": str(bench)}, max_new_tokens=2, progress=False)
    card_folder = tmp_path / "card"
    shutil.copytree(saved_model, card_folder)
    card = save_model_card(card_folder, eval_results=results["model_index"])
    names = [r.dataset_name for r in card.data.eval_results]
    assert "digits VQA (digits-vqa.jsonl)" in names and "MME (mme.jsonl)" in names
    assert "model-index" in (card_folder / "README.md").read_text()


def _demo_answer(model, processor, image, question):
    """Contract 2's procedure, one question at a time: chat template, greedy, 8 new tokens, special tokens skipped."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_digits_vqa_reproduces_the_demo_scoring(loaded, tmp_path):
    """Contract 2: a held-out file in the demo's format, scored by the harness (batched, left padded), gives exactly
    the accuracy of the demo's own rule applied to one-by-one generation."""
    model, processor = loaded
    eval_dir = tmp_path / "demo" / "eval"
    (eval_dir / "images").mkdir(parents=True)
    questions = ["Which digit is shown?", "Is the digit even or odd? Answer in one word please.", "Digit?"]
    rows, expected = [], []
    for i, image in enumerate(digit_images(9)):
        image.save(eval_dir / "images" / f"digit_{i}.png")
        question = questions[i % 3]
        answer = _demo_answer(model, processor, image, question)
        gold = answer if i % 3 != 2 else "seven"  # two thirds answered "right"
        if i == 4:
            gold = answer.upper() + "."  # the demo rule ignores case and a final period
        rows.append({"question_id": f"d{i}", "image": f"images/digit_{i}.png", "question": question, "answer": gold,
                     "question_type": ["name", "parity", "short"][i % 3]})
        expected.append(answer.strip().lower().rstrip(".") == gold.strip().lower().rstrip("."))
    (eval_dir / "digits_vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overall = sum(expected) / len(expected)
    assert 0 < overall < 1

    results = evaluate_model(model, processor, ["digits-vqa"], tmp_path / "eval", batch_size=4, progress=False,
                             data={"digits-vqa": str(eval_dir / "digits_vqa.jsonl")})
    metrics = results["results"]["digits-vqa"]["metrics"]
    assert metrics["accuracy"] == overall
    assert metrics["accuracy_by_question_type"]["short"] == 0.0


def test_accelerate_launch_shards_over_two_cpu_processes(loaded, saved_model, bench, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m ml_mamba.evaluation` on a CPU-only machine (two gloo
    processes) gives the single-process results."""
    import subprocess
    import sys

    model, processor = loaded
    args = ["--model", saved_model, "--tasks", "digits-vqa,pope", "--data", f"digits-vqa={bench}", f"pope={bench}",
            "--batch-size", "2", "--no-progress"]
    single = cli_run(args + ["--output-dir", str(tmp_path / "single")])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no",
                               "-m", "ml_mamba.evaluation", *args, "--output-dir", str(tmp_path / "sharded")],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    for rank in (0, 1):  # both processes did half of each task
        assert f"digits-vqa: process {rank} of 2 predicted 3 examples" in launched.stderr
        assert f"pope: process {rank} of 2 predicted 3 examples" in launched.stderr
    sharded = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert sharded["results"]["digits-vqa"]["metrics"] == single["results"]["digits-vqa"]["metrics"]
    assert sharded["results"]["pope"]["metrics"] == single["results"]["pope"]["metrics"]
    for task in ("digits-vqa", "pope"):
        assert not list((tmp_path / "sharded" / task).glob("predictions.rank-*"))  # merged into one file
        one, two = _predictions(tmp_path / "single", task), _predictions(tmp_path / "sharded", task)
        assert [r["prediction"] for r in one] == [r["prediction"] for r in two]


def test_any_image_text_to_text_model_llava(bench, tmp_path):
    """The harness is not tied to ML-Mamba: a tiny random transformers LLaVA, saved and reloaded through the Auto
    classes, runs generated-text and next-token tasks."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from utils import CLIP, tokenizer

    tok = tokenizer()
    config = LlavaConfig(vision_config=dict(CLIP), image_token_id=tok.convert_tokens_to_ids("<image>"),
                         text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          vocab_size=len(tok), pad_token_id=0, bos_token_id=0, eos_token_id=0))
    torch.manual_seed(0)
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", chat_template=template)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    model, processor = load_model(str(tmp_path / "llava"))
    results = evaluate_model(model, processor, ["digits-vqa", "pope"], tmp_path / "eval", batch_size=3,
                             data={"digits-vqa": str(bench), "pope": str(bench)}, max_new_tokens=3, progress=False)
    assert results["results"]["pope"]["num_examples"] == ROWS
    assert all(set(r["probabilities"]) == {"Yes", "No"} for r in _predictions(tmp_path / "eval", "pope"))
    assert "USER: <image>\nWhich digit is shown?" in json.loads(
        (tmp_path / "eval" / "digits-vqa" / "run_config.json").read_text())["example_prompt"]


def test_trained_digits_demo_is_reproduced(tmp_path, trained_demo):
    """Contract 2 on the real demo (trained once per session by the `trained_demo` fixture, ~2 min): the harness's
    accuracy on `<demo>/eval/digits_vqa.jsonl` equals the `overall` (and per-type) accuracy the demo wrote to
    `<demo>/eval/demo_results.json`."""
    demo = trained_demo
    expected = json.loads(open(os.path.join(demo, "eval", "demo_results.json")).read())
    model, processor = load_model(demo)
    results = evaluate_model(model, processor, ["digits-vqa"], tmp_path, batch_size=16, progress=False,
                             data={"digits-vqa": os.path.join(demo, "eval", "digits_vqa.jsonl")})
    metrics = results["results"]["digits-vqa"]
    scale = 100.0 if expected["overall"] > 1 else 1.0  # the demo may report percentages
    assert metrics["num_examples"] == expected["num_examples"]
    assert metrics["metrics"]["accuracy"] * scale == expected["overall"]
    for question_type, accuracy in expected["per_type"].items():
        assert metrics["metrics"]["accuracy_by_question_type"][question_type] * scale == pytest.approx(accuracy)
