"""`MLMambaProcessor`: images and text in, the tensors `MLMambaForConditionalGeneration` reads out."""

from __future__ import annotations

import torch
from transformers import AddedToken, ProcessorMixin
from transformers.image_utils import make_flat_list_of_images

from .ml_mamba_chat_templates import ZEPHYR_CHAT_TEMPLATE
from .ml_mamba_image_utils import map_images
from .ml_mamba_video_utils import load_video

# The two normalisations of the fused DINOv2 + SigLIP tower, in tower order (DESIGN.md).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIGLIP_MEAN, SIGLIP_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Each single tower's own normalisation, by model type.
TOWER_NORMALIZATIONS = {"siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD), "clip_vision_model": (CLIP_MEAN, CLIP_STD),
                        "dinov2": (IMAGENET_MEAN, IMAGENET_STD), "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD)}
DINO_SIGLIP_NORMALIZATIONS = [{"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, {"mean": SIGLIP_MEAN, "std": SIGLIP_STD}]


class MLMambaProcessor(ProcessorMixin):
    r"""Image processor + tokenizer for ML-Mamba, Cobra and VL-Mamba models.

    Each `<image>` placeholder in the text is expanded to `num_image_tokens` tokens (the number the model's connector
    emits, `config.num_image_tokens`), which the model replaces with visual features.

    Args:
        image_processor: any transformers image processor (e.g. `SiglipImageProcessor`). For the fused DINOv2+SigLIP
            tower, give it `do_normalize=False` behaviour via `image_normalizations` (see below).
        tokenizer: any tokenizer. `<image>` is added as a special token when missing, the padding side is set to
            "left" (what batched generation needs; TRL pads training batches on the right itself) and a missing pad
            token falls back to the end-of-sequence token.
        chat_template (`str`, *optional*): defaults to the Zephyr template of Cobra / ML-Mamba.
        num_image_tokens (`int`): tokens per image, i.e. `model.config.num_image_tokens`.
        image_token (`str`, defaults to `"<image>"`).
        image_normalizations (`list[dict]`, *optional*): one `{"mean": [...], "std": [...]}` per tower of a fused vision
            tower; the image is resized and rescaled once and normalised once per tower, giving `pixel_values` with
            3 channels per tower (`DINO_SIGLIP_NORMALIZATIONS` for ML-Mamba and Cobra).
        max_prompt_length (`int`, *optional*): prompts longer than this (image tokens included) are rejected with
            a `ValueError` instead of being silently truncated through the image tokens.
        num_frame_tokens (`int`, *optional*): tokens per video frame, i.e. `model.config.num_video_frame_tokens`;
            set for a model with video support (``config.video_token_id``), which adds ``video_token`` to the
            tokenizer. Each `<video>` placeholder then expands to its sampled frames, each ``frame_template``
            (formatted with ``index`` and ``time`` in seconds; default none) followed by ``num_frame_tokens``
            video tokens, and the frames come out as ``pixel_values_videos``.
        video_token (`str`, defaults to `"<video>"`).
        frame_template (`str`, *optional*): text before each frame's tokens, e.g. ``"{time:.1f}s: "``.

    Videos (``videos=``, or ``{"type": "video", "video"/"path": ...}`` items in a chat) are file paths (decoded with
    PyAV), lists of frames or 4-D arrays; ``num_frames=`` or ``fps=`` samples them evenly (``video_fps=`` gives the
    frame rate of frames passed as arrays); ``return_video_timestamps=True`` returns the sampled times.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=None,
                 image_token="<image>", image_normalizations=None, max_prompt_length=None, num_frame_tokens=None,
                 video_token="<video>", frame_template=None, **kwargs):
        if tokenizer is None:
            raise ValueError("MLMambaProcessor needs a `tokenizer`.")
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if num_frame_tokens is not None:
            if not isinstance(num_frame_tokens, int) or num_frame_tokens < 1:
                raise ValueError(f"`num_frame_tokens` must be a positive int, got {num_frame_tokens!r}.")
            if video_token not in tokenizer.get_vocab():
                tokenizer.add_tokens([AddedToken(video_token, special=True, normalized=False)], special_tokens=True)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if num_image_tokens is not None and (not isinstance(num_image_tokens, int) or num_image_tokens < 1):
            raise ValueError(f"`num_image_tokens` must be a positive int, got {num_image_tokens!r}.")
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.num_image_tokens = num_image_tokens
        self.image_normalizations = image_normalizations
        self.max_prompt_length = max_prompt_length
        self.num_frame_tokens, self.frame_template = num_frame_tokens, frame_template
        # ProcessorMixin expands `video_token` with what `_process_videos` returns (and tracks the offsets, which
        # TRL's assistant-only loss needs); without video support the model has none.
        self.video_token = video_token if num_frame_tokens is not None else None
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if num_frame_tokens is not None else None
        self._video_times = []
        super().__init__(image_processor, tokenizer,
                         chat_template=chat_template if chat_template is not None else ZEPHYR_CHAT_TEMPLATE)

    @classmethod
    def from_config(cls, config, tokenizer, image_processor=None, image_normalizations=None,
                    check_vocab_size: bool = True, **kwargs):
        """The processor that matches a model config (`MLMambaConfig`): square resize to ``config.image_size``, the
        vision tower's normalisation (one per tower for the fused DINOv2 + SigLIP tower), ``num_image_tokens``.

        ```python
        >>> config = preset_config("ml-mamba-2.7b", tokenizer=tokenizer)  # image_token_id and vocab from the tokenizer
        >>> processor = MLMambaProcessor.from_config(config, tokenizer)
        ```
        Raises when the two disagree: a different ``<image>`` id than ``config.image_token_id``, or token ids beyond
        the language model's vocabulary (``check_vocab_size=False`` when you resize the embeddings afterwards).
        """
        from transformers import SiglipImageProcessor

        vision = config.vision_config
        fused = vision.model_type == "ml_mamba_fused_vision"
        if image_processor is None:
            mean, std = TOWER_NORMALIZATIONS.get(getattr(vision, "model_type", None), (SIGLIP_MEAN, SIGLIP_STD))
            image_processor = SiglipImageProcessor(size={"height": config.image_size, "width": config.image_size},
                                                   image_mean=mean, image_std=std)
        if fused and image_normalizations is None:
            image_normalizations = DINO_SIGLIP_NORMALIZATIONS
        if getattr(config, "video_token_id", None) is not None:
            kwargs.setdefault("num_frame_tokens", config.num_video_frame_tokens)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens,
                        image_normalizations=image_normalizations if fused else None, **kwargs)
        if config.image_token_id is not None and config.image_token_id != processor.image_token_id:
            raise ValueError(f"config.image_token_id is {config.image_token_id} but the tokenizer's "
                             f"{processor.image_token} is {processor.image_token_id}: build the config with "
                             f"`preset_config(..., tokenizer=tokenizer)` or set config.image_token_id = "
                             f"{processor.image_token_id}.")
        vocab_size = config.text_config.vocab_size
        if check_vocab_size and len(processor.tokenizer) > vocab_size:
            raise ValueError(f"The tokenizer has {len(processor.tokenizer)} tokens ({processor.image_token} included) "
                             f"but the language model's vocabulary is {vocab_size}: raise "
                             f"config.text_config.vocab_size (preset_config(..., tokenizer=tokenizer) does).")
        return processor

    def __call__(self, images=None, text=None, videos=None, audio=None, num_frames=None, fps=None, video_fps=None,
                 return_video_timestamps=False, **kwargs):
        """`processor(images=..., text=..., videos=...)`: text is a string or a list (one per sample); images and
        videos a list in placeholder order, or one list per sample (then each sample's count is checked)."""
        if images is not None:
            images = map_images(images)
        loaded = None
        if videos is not None:
            loaded = self._load_videos(text, videos, num_frames, fps, video_fps)
            self._video_times = [times for _, times in loaded]  # read by `_process_videos` during this call
        elif text is not None and self.video_token is not None:
            texts = [text] if isinstance(text, str) else text
            if any(self.video_token in sample for sample in texts):
                raise ValueError(f"The text holds {self.video_token} placeholders but no `videos` were given.")
        outputs = super().__call__(images=images, text=text, audio=audio, **kwargs,
                                   videos=[frames for frames, _ in loaded] if loaded else None)
        if loaded and return_video_timestamps:
            outputs["video_timestamps"] = [times for _, times in loaded]
        if self.max_prompt_length is not None and "input_ids" in outputs:
            self._check_prompt_lengths(outputs)
        return outputs

    @property
    def video_processor(self):
        """None: frames go through the image processor (`_process_videos`); present so that ProcessorMixin
        hands videos to it."""
        return None

    def _load_videos(self, text, videos, num_frames, fps, video_fps) -> list[tuple[list, list[float]]]:
        """(frames, timestamps) per video, in placeholder order, after checking placeholders against videos."""
        if self.video_token is None:
            raise ValueError("This processor has no video support: build it with `num_frame_tokens=model.config."
                             "num_video_frame_tokens` (a model whose config has a `video_token_id`).")
        if text is None:
            raise ValueError("`videos` need a `text` with one video placeholder per video.")
        texts = [text] if isinstance(text, str) else list(text)
        if _is_video(videos) and (not isinstance(videos, (list, tuple)) or _is_frame(videos[0])):
            videos = [videos]  # a single video
        per_sample = len(videos) == len(texts) and all(
            isinstance(sample, (list, tuple)) and all(_is_video(video) for video in sample) for sample in videos)
        if per_sample:
            for index, (sample, sample_videos) in enumerate(zip(texts, videos)):
                found = sample.count(self.video_token)
                if found != len(sample_videos):
                    raise ValueError(f"Sample {index} has {found} {self.video_token} placeholder(s) but "
                                     f"{len(sample_videos)} video(s); put one placeholder in the text for each video.")
            flat = [video for sample in videos for video in sample]
        else:
            flat = list(videos)
            found = sum(sample.count(self.video_token) for sample in texts)
            if found != len(flat):
                raise ValueError(f"The text holds {found} {self.video_token} placeholder(s) but {len(flat)} "
                                 f"video(s) were given; put one placeholder in the text for each video.")
        return [load_video(video, num_frames, fps, video_fps, name=f"videos[{index}]")
                for index, video in enumerate(flat)]

    def _process_videos(self, videos, **kwargs):
        """``pixel_values_videos`` (every frame of every video, in order) and each video's expansion: per frame,
        ``frame_template`` and ``num_frame_tokens`` video tokens."""
        replacements = ["".join((self.frame_template or "").format(index=i, time=t)
                                + self.video_token * self.num_frame_tokens for i, t in enumerate(times))
                        for times in self._video_times]
        return {"pixel_values_videos": self._pixels([frame for frames in videos for frame in frames])}, replacements

    def _pixels(self, images) -> torch.Tensor:
        """``pixel_values`` of ``images`` as the model reads them (per-tower normalisations for a fused tower)."""
        if not self.image_normalizations:
            return self.image_processor(images, return_tensors="pt")["pixel_values"]
        return self._process_images(images)[0]["pixel_values"]

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if text is not None and images is not None and isinstance(images, list) and len(images) == len(text) \
                and any(isinstance(sample, list) for sample in images):
            for index, (sample_text, sample_images) in enumerate(zip(text, images)):
                found = sample_text.count(self.image_token)
                given = len(sample_images) if isinstance(sample_images, list) else 1
                if found != given:
                    raise ValueError(f"Sample {index} has {found} {self.image_token} placeholder(s) but {given} "
                                     f"image(s); put one placeholder in the text for each image.")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.num_image_tokens is None:
            raise ValueError("This processor does not know how many tokens an image takes: build it with "
                             "`num_image_tokens=model.config.num_image_tokens`.")
        return self.image_token * self.num_image_tokens

    def _process_images(self, images, **kwargs):
        if not self.image_normalizations:
            return super()._process_images(images, **kwargs)
        # One resize + rescale, then one normalisation per tower, stacked on the channel axis.
        kwargs = {**kwargs, "do_normalize": False, "return_tensors": "pt"}
        processed = self.image_processor(images, **kwargs)
        pixels = processed["pixel_values"]
        channels = []
        for norm in self.image_normalizations:
            mean = torch.tensor(norm["mean"], dtype=pixels.dtype).view(1, -1, 1, 1)
            std = torch.tensor(norm["std"], dtype=pixels.dtype).view(1, -1, 1, 1)
            channels.append((pixels - mean) / std)
        processed["pixel_values"] = torch.cat(channels, dim=1)
        replacements = [self.replace_image_token(processed, image_idx=i)
                        for i in range(len(make_flat_list_of_images(images)))]
        return processed, replacements

    def _check_prompt_lengths(self, outputs):
        if "attention_mask" in outputs:
            lengths = [int(sum(mask)) if isinstance(mask, list) else int(mask.sum()) for mask in outputs["attention_mask"]]
        else:
            lengths = [len(ids) for ids in outputs["input_ids"]]
        for index, length in enumerate(lengths):
            if length > self.max_prompt_length:
                raise ValueError(f"Sample {index} is {length} tokens long (image tokens included), more than "
                                 f"max_prompt_length={self.max_prompt_length}. Shorten the text or raise the limit.")

    @property
    def model_input_names(self):
        names = ["input_ids", "attention_mask", "pixel_values"]
        return names + ["pixel_values_videos"] if self.num_frame_tokens is not None else names


def _is_frame(value) -> bool:
    """A PIL image or a 3-D array / tensor."""
    return hasattr(value, "shape") and len(value.shape) == 3 or hasattr(value, "getpixel")


def _is_video(value) -> bool:
    """A path, a 4-D array / tensor of frames, or a non-empty list of frames."""
    if isinstance(value, str):
        return True
    if hasattr(value, "shape"):
        return len(value.shape) == 4
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_frame(frame) for frame in value)


__all__ = ["MLMambaProcessor", "DINO_SIGLIP_NORMALIZATIONS"]
