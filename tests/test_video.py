"""Videos and many images in one prompt: the processor's `<video>` placeholder and frame sampling (lists, arrays,
files decoded with PyAV, chat templates), clear errors for bad input, and the model's video path (frames encoded
`vision_batch_size` at a time, pooled per `video_frame_pool`) against the image path it is built from."""

import numpy as np
import pytest
import torch
from transformers import SiglipImageProcessor
from utils import IMAGE_SIZE, digit_images, tiny_config, tokenizer

from modeling_ml_mamba import MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME
from ml_mamba.processing.ml_mamba_video_utils import load_video, sample_indices


def video_model(pool: int = 1, text: str = "mamba2", seed: int = 0, **overrides):
    tok = tokenizer()
    config = tiny_config("mlp", text=text, video_frame_pool=pool, **overrides).fit_tokenizer(tok, video_token="<video>")
    torch.manual_seed(seed)
    model = MLMambaForConditionalGeneration(config).eval()
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, MLMambaProcessor.from_config(config, tok, image_processor=image_processor)


def test_sampling_is_even_and_bad_counts_are_refused():
    assert sample_indices(10, num_frames=5) == [1, 3, 5, 7, 9]
    assert sample_indices(10, num_frames=1) == [5]
    assert sample_indices(12, fps=2, source_fps=4) == [0, 2, 4, 6, 8, 10]
    assert sample_indices(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_frames=8 but video has only 4 frames"):
        sample_indices(4, num_frames=8)
    with pytest.raises(ValueError, match="has no frames"):
        sample_indices(0)
    with pytest.raises(ValueError, match="not both"):
        sample_indices(4, num_frames=2, fps=1, source_fps=4)
    with pytest.raises(ValueError, match="video_fps"):
        sample_indices(4, fps=1)


def test_processor_expands_a_video_into_frame_tokens_with_timestamps():
    model, processor = video_model(pool=2)
    assert model.config.num_video_frame_tokens == 4  # a 4x4 grid pooled 2x2
    processor.frame_template = "{time:.1f}s:"
    frames = digit_images(6)
    out = processor(text="<video>Which digits?", videos=frames, num_frames=3, video_fps=2.0,
                    return_video_timestamps=True, return_tensors="pt")
    assert out["pixel_values_videos"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out["video_timestamps"] == [[0.5, 1.5, 2.5]]
    ids = out["input_ids"][0]
    assert int((ids == processor.video_token_id).sum()) == 3 * 4
    text = processor.decode(ids)
    assert text.index("0.5s:") < text.index("1.5s:") < text.index("2.5s:")
    # a 4-D array and a tensor of frames are videos too
    array = np.stack([np.asarray(frame) for frame in frames])
    for video in (array, torch.from_numpy(array).permute(0, 3, 1, 2)):
        again = processor(text="<video>Which digits?", videos=video, num_frames=3, return_tensors="pt")
        torch.testing.assert_close(again["pixel_values_videos"], out["pixel_values_videos"])


def test_bad_video_input_gets_a_clear_error(tmp_path):
    _, processor = video_model()
    frames = digit_images(4)
    cases = [
        (dict(text="<video>Q", videos=frames, num_frames=9), "num_frames=9 but videos\\[0\\] has only 4 frames"),
        (dict(text="<video>Q", videos=np.zeros((0, 8, 8, 3), np.uint8)), "videos\\[0\\] has no frames"),
        (dict(text="<video><video>Q", videos=[frames]), "2 <video> placeholder\\(s\\) but 1 video"),
        (dict(text="Q", videos=[frames]), "0 <video> placeholder\\(s\\) but 1 video"),
        (dict(text="<video>Q"), "no `videos` were given"),
        (dict(text="<video>Q", videos=str(tmp_path / "missing.mp4")), "no video file at"),
    ]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    cases.append((dict(text="<video>Q", videos=str(broken)), "could not decode the video"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            processor(**kwargs)


def test_a_video_file_is_decoded_and_sampled(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "digits.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = IMAGE_SIZE
        stream.pix_fmt = "yuv420p"
        for image in digit_images(12):
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    frames, times = load_video(path, num_frames=4)
    assert len(frames) == 4 and times == pytest.approx([0.25, 1.0, 1.75, 2.5])
    frames, times = load_video("file://" + path, fps=2)
    assert len(frames) == 6 and times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    _, processor = video_model()
    chat = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "Which?"}]}]
    out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"num_frames": 3})
    assert out["pixel_values_videos"].shape[0] == 3


def test_video_frames_are_images_to_the_model_and_images_interleave():
    """With pooling off, a video's frames give exactly the logits of the same frames passed as images; images and
    a video interleave in one prompt; generation runs."""
    model, processor = video_model()
    frames, picture = digit_images(3), digit_images(1, start=5)[0]
    as_video = processor(text="<image>Look.<video>Which digits?", images=[picture], videos=[frames],
                         return_tensors="pt")
    as_images = processor(text="<image>Look.<image><image><image>Which digits?", images=[picture, *frames],
                          return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**as_video).logits, model(**as_images).logits)
    generated = model.generate(**as_video, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == as_video["input_ids"].shape[1] + 3
    chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "video", "video": frames},
                                         {"type": "text", "text": "Which digits?"}]}]
    templated = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt")
    assert templated["pixel_values_videos"].shape[0] == 3 and templated["pixel_values"].shape[0] == 1


def test_frames_are_encoded_in_bounded_batches_and_pooled():
    model, processor = video_model(pool=2, vision_batch_size=2)
    pixels = processor(text="<video>Q", videos=[digit_images(5)], return_tensors="pt")["pixel_values_videos"]
    with torch.no_grad():
        pooled = model.model.get_video_features(pixels)
        model.config.vision_batch_size = 100  # all at once: the reference
        full = model.model.get_image_features(pixels).pooler_output
    grid = full.transpose(1, 2).reshape(5, -1, 4, 4)
    expected = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="video_frame_pool must be a positive int"):
        tiny_config("mlp", video_frame_pool=0)


def test_a_long_prefill_runs_the_language_model_in_segments_with_the_same_results():
    """A prompt longer than `lm_prefill_segment` goes through the LM a segment at a time (all layers per segment,
    the cache carried between): the logits, the cache and the generated tokens of a left-padded batch equal those
    of the whole prompt at once."""
    model, processor = video_model()
    texts = ["A long look.<video>Which digits?", "<video>Which?"]
    inputs = processor(text=texts, videos=[digit_images(4), digit_images(2, start=4)], padding=True,
                       return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    calls = []
    model.model.language_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    results = {}
    for segment in (10_000, 7):
        model.model.lm_prefill_segment = segment
        calls.clear()
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        prefill_calls = list(calls)
        generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        results[segment] = out, prefill_calls, generated
    assert results[10_000][1] == [length]
    assert len(results[7][1]) == -(-length // 7) and sum(results[7][1]) == length and min(results[7][1]) > 1
    whole, pieces = results[10_000][0], results[7][0]
    torch.testing.assert_close(pieces.logits, whole.logits, atol=1e-5, rtol=1e-4)
    for layer in range(model.config.text_config.num_hidden_layers):
        torch.testing.assert_close(getattr(pieces, CACHE_NAME).get_recurrent_state(layer),
                                   getattr(whole, CACHE_NAME).get_recurrent_state(layer), atol=1e-5, rtol=1e-4)
    assert torch.equal(results[7][2], results[10_000][2])


def test_training_takes_video_samples(tmp_path):
    """`build_trainer` (TRL's SFTTrainer and collator) trains on samples whose user turn holds a video; the loss is
    on the answers and the weights move."""
    from datasets import Dataset, Image, List

    from ml_mamba.training.arguments import MLMambaSFTConfig
    from ml_mamba.training.train import build_trainer

    model, processor = video_model(pool=2, seed=1)
    rows = []
    for start in range(6):
        rows.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "Which digits?"},
                                                                {"type": "video"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}],
                     "images": [], "videos": [digit_images(2 + start % 3, start=start)]})
    dataset = Dataset.from_list(rows).cast_column("videos", List(List(Image())))
    args = MLMambaSFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=3,
                            learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1)
    before = model.model.connector.state_dict()
    before = {name: tensor.clone() for name, tensor in before.items()}
    trainer = build_trainer(model, processor, args, dataset)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    assert batch["pixel_values_videos"].shape[0] == 2 + 3  # both samples' frames
    for labels in batch["labels"]:  # the loss is on the answer (and its end of turn) only, not on frame tokens
        assert processor.decode(labels[labels != -100]) == "seven<|endoftext|>"
    trainer.train()
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    after = model.model.connector.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # frames reach the connector's grads


def test_the_video_digits_task_scores_like_one_by_one_generation(tmp_path):
    """The video demo's held-out file (`write_held_out_task`), scored by `ml-mamba-eval`'s video-digits task
    (batched, left padded, question before the video) equals the demo's rule on one-by-one generation."""
    from sklearn.datasets import load_digits

    from ml_mamba.evaluation import evaluate_model
    from ml_mamba.training.digits_demo import digit_image, is_correct
    from ml_mamba.training.video_demo import chat, write_held_out_task

    model, processor = video_model(pool=1, seed=2)
    images = load_digits().images
    samples = []
    for number in range(6):
        frames = [number + k for k in range(2 + number % 3)]
        samples.append({"frames": frames, "question_type": ["first", "last"][number % 2],
                        "question": ["Which digit is shown first?", "Which digit is shown last?"][number % 2]})
    expected = []
    for number, sample in enumerate(samples):
        text = processor.apply_chat_template(chat(sample["question"]), add_generation_prompt=True, tokenize=False)
        inputs = processor(videos=[[digit_image(images[i]) for i in sample["frames"]]], text=text,
                           return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        sample["answer"] = answer if number % 3 else "seven"  # two thirds answered "right"
        expected.append(is_correct(answer, sample["answer"]))
    assert 0 < sum(expected) < len(expected)
    path = write_held_out_task(str(tmp_path / "demo"), images, samples)
    results = evaluate_model(model, processor, ["video-digits"], tmp_path / "eval", batch_size=4, progress=False,
                             data={"video-digits": path})
    metrics = results["results"]["video-digits"]["metrics"]
    assert metrics["accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert set(metrics["accuracy_by_question_type"]) == {"first", "last"}


def test_a_video_row_without_frames_is_refused(tmp_path):
    from ml_mamba.evaluation import TaskDataError, get_task, load_examples

    path = tmp_path / "videos.jsonl"
    path.write_text('{"question_id": "a", "video": "clip.mp4", "question": "Which digit?", "answer": "one"}\n')
    with pytest.raises(TaskDataError, match="needs a non-empty list of frame paths"):
        load_examples(get_task("video-digits"), str(path))


def test_the_question_mix_sets_how_often_each_type_is_asked_and_answers_are_right():
    from collections import Counter

    from ml_mamba.training.digits_demo import NUMBER_WORDS, split_digits
    from ml_mamba.training.video_demo import VideoDemoSettings, make_videos

    images, labels, train_idx, _ = split_digits(0.2, 0)
    samples = make_videos(images, labels, train_idx, 30, VideoDemoSettings(), 0, ("after", "count_odd", "after"))
    assert Counter(s["question_type"] for s in samples) == {"after": 20, "count_odd": 10}
    for sample in samples:
        frames = sample["labels"]
        assert frames == [int(labels[i]) for i in sample["frames"]]
        if sample["question_type"] == "count_odd":
            assert sample["answer"] == str(sum(d % 2 for d in frames))
        else:
            named = NUMBER_WORDS.index(sample["question"].rsplit(" ", 1)[-1].rstrip("?"))
            assert frames.count(named) == 1 and frames.index(named) < len(frames) - 1
            assert sample["answer"] == NUMBER_WORDS[frames[frames.index(named) + 1]]


def test_the_video_demo_runs_end_to_end_and_its_task_reproduces_its_score(tmp_path):
    """`ml-mamba-demo --task video` in miniature: the three training stages, save, reload (the frame separator
    kept), per-type scores, and the held-out file that `ml-mamba-eval` scores to the same accuracy."""
    import json

    from transformers import AutoProcessor

    from ml_mamba.evaluation import evaluate_model, load_model
    from ml_mamba.training.video_demo import QUESTION_TYPES, VideoDemoSettings, run_video_demo

    settings = VideoDemoSettings(output_dir=str(tmp_path / "demo"), train_videos=40, held_out_videos=15,
                                 short_videos=20, image_warmup_epochs=0.05, epochs=1, batch_size=8,
                                 dataloader_workers=0, lm_layers=2, hidden_size=32)
    results = run_video_demo(settings)
    assert results["num_examples"] == 15 and set(results["per_type"]) == set(QUESTION_TYPES)
    assert AutoProcessor.from_pretrained(settings.output_dir, trust_remote_code=True).frame_template == "|"
    saved = json.loads((tmp_path / "demo" / "eval" / "demo_results.json").read_text())
    assert saved["overall"] == results["overall"]
    model, processor = load_model(settings.output_dir)
    harness = evaluate_model(model, processor, ["video-digits"], tmp_path / "eval", batch_size=200, progress=False,
                             max_new_tokens=4, data={"video-digits": str(tmp_path / "demo" / "eval" /
                                                                          "video_digits.jsonl")})
    assert harness["results"]["video-digits"]["metrics"]["accuracy"] == pytest.approx(results["overall"])
