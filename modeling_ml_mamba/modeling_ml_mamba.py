"""ML-Mamba, Cobra and VL-Mamba as transformers models: vision tower -> connector -> Mamba language model.

The data flow reads top to bottom in `MLMambaModel.forward`, the Llava way: embed the text, encode the images
(`get_image_features`), find the `<image>` placeholders (`get_placeholder_mask`), scatter the visual features into
the embeddings, run the Mamba LM. The LM is transformers' own `Mamba2Model` / `MambaModel`, so its cache
(a `DynamicCache` of constant-size conv + SSM states), left padding and mamba-ssm kernels come from transformers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoModel, Cache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput

from .configuration_ml_mamba import MLMambaConfig
from .ml_mamba_compat import CACHE_NAME, output_with_cache, pick_cache
from .ml_mamba_connectors import build_connector
from .ml_mamba_decode import StaticDecoder, can_decode_statically, input_dtype, store_transposed, use_gemv_layout
from .ml_mamba_fast_mamba2 import enable_fast_mamba2
from .ml_mamba_norm import GatedRMSNorm
from .ml_mamba_scan import ScanDirection
from .ml_mamba_ssd import equal_part_length
from .ml_mamba_vision import build_vision_tower


@output_with_cache
class MLMambaModelOutput(ModelOutput):
    """Output of `MLMambaModel`: the LM's last hidden state, its recurrent cache and the projected image features.

    The cache field is `cache` from transformers 5.24 on and `cache_params` before (`ml_mamba_compat`)."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@output_with_cache
class MLMambaCausalLMOutput(ModelOutput):
    """Output of `MLMambaForConditionalGeneration` (cache field named as in `MLMambaModelOutput`)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class MLMambaPreTrainedModel(PreTrainedModel):
    config_class = MLMambaConfig
    config: MLMambaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _is_stateful = True  # a recurrent cache cannot be rolled back: no assisted decoding
    _skip_keys_device_placement = ["cache", "cache_params", "past_key_values"]
    # Units that are never split across devices or FSDP shards (accelerate's TRANSFORMER_BASED_WRAP and
    # `device_map="auto"` read this): each LM block, each vision layer, each scan-connector block.
    _no_split_modules = ["Mamba2Block", "MambaBlock", "SiglipEncoderLayer", "CLIPEncoderLayer", "Dinov2Layer",
                         "Dinov2WithRegistersLayer", "ScanBlock"]
    _supports_sdpa = True  # lets `attn_implementation="sdpa"` reach the vision tower
    # Loaded in bfloat16/float16, the SSM parameters and the gated norms stay float32 (low precision there makes Mamba
    # models drift); the block RMSNorms compute in float32 from their low-precision weights, as transformers does.
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias", "mixer.D", "directions.*.D", "mixer.norm"]
    _supports_flash_attn = True

    def save_pretrained(self, *args, **kwargs):
        """transformers' `save_pretrained`, with weights in PyTorch's default layout (the static decode step stores
        them transposed on CPU, `use_gemv_layout`; saving restores the default layout, then the decode layout)."""
        restored = use_gemv_layout(self, enabled=False)
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            for linear in restored:
                store_transposed(linear)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: our `_init_weights` writes through `transformers.initialization`, like the library's own models.
        transformers guards custom code with a shortcut that skips a module once its direct parameters are
        initialised; it passes that flag down to the vision tower, where it skipped SigLIP's attention and MLP inits
        (those modules hold no direct parameters), so `from_pretrained` with missing weights initialised them
        differently from `__init__`."""
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/Conv/LayerNorm/Embedding with config.initializer_range
        if isinstance(module, ScanDirection):
            heads = module.A_log.numel()
            init.copy_(module.A_log, torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt), as Mamba-2 does
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
        elif isinstance(module, GatedRMSNorm):
            init.ones_(module.weight)


class MLMambaModel(MLMambaPreTrainedModel):
    """Vision tower + connector + Mamba LM, without the LM head. Returns the LM's hidden states."""

    # Tokens per language-model call of a long Mamba-2 prefill without gradients on CPU (`_prefills_in_segments`).
    lm_prefill_segment = 16384

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.connector = build_connector(config, config.vision_config.hidden_size, config.text_config.hidden_size)
        if config.text_config._attn_implementation not in (None, "eager"):
            # The Mamba LM has no attention: `attn_implementation="sdpa"` (a string reaches every sub-config) is
            # for the vision tower; the LM takes eager, as transformers' own Mamba models do.
            config.text_config._attn_implementation = "eager"
        self.language_model = AutoModel.from_config(config.text_config)
        if getattr(config, "use_fast_cpu_path", True):  # Mamba-2 LM: faster PyTorch path on CPU, same weights
            enable_fast_mamba2(self.language_model)
        self.post_init()
        self.freeze_unused_vision_parameters()

    def unused_vision_parameter_names(self) -> list[str]:
        """Vision-tower parameters that never reach the features at ``config.vision_feature_layer`` (the layers
        after it, the final norm, a pooling head, DINOv2's mask token), as `named_parameters` names."""
        return [f"vision_tower.{name}"
                for name in self.vision_tower.unused_parameter_names(self.config.vision_feature_layer)]

    def freeze_unused_vision_parameters(self) -> int:
        """``requires_grad=False`` on `unused_vision_parameter_names` (they would never get a gradient: DDP
        without ``find_unused_parameters`` refuses such parameters). Returns how many were frozen."""
        names = self.unused_vision_parameter_names()
        for name in names:
            self.get_parameter(name).requires_grad_(False)
        return len(names)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.FloatTensor, vision_feature_layer: int | None = None,
                           output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        """Encode images the vision-language way of transformers 5.24+ (as LLaVA does).

        Returns a `BaseModelOutputWithPooling` (a tuple with ``return_dict=False``): ``pooler_output`` the projected
        features the LM reads, (images, num_image_tokens, text_hidden); ``last_hidden_state`` the vision features
        the connector reads (patch tokens at ``vision_feature_layer``, default ``config.vision_feature_layer``);
        ``hidden_states`` the tower's hidden states if ``output_hidden_states`` (for a fused tower, one tuple per
        tower).
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        connector_dtype = next(self.connector.parameters()).dtype
        batch = self.config.vision_batch_size
        if output_hidden_states or pixel_values.shape[0] <= batch:
            features, hidden_states = self.vision_tower(pixel_values, layer)
            projected = self.connector(features.to(connector_dtype))
        else:  # many images or frames: `vision_batch_size` at a time, so the vision side's memory stays bounded
            hidden_states, pieces = None, [self._encode(pixel_values[start:start + batch], layer, connector_dtype)
                                           for start in range(0, pixel_values.shape[0], batch)]
            features, projected = (torch.cat(part, dim=0) for part in zip(*pieces))
        output = BaseModelOutputWithPooling(
            last_hidden_state=features,
            pooler_output=projected,
            hidden_states=hidden_states if output_hidden_states else None,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()

    def _encode(self, pixel_values, layer, connector_dtype):
        features, _ = self.vision_tower(pixel_values, layer)
        return features, self.connector(features.to(connector_dtype))

    def get_video_features(self, pixel_values_videos: torch.FloatTensor, **kwargs) -> torch.FloatTensor:
        """The LM-ready features of video frames, (frames, num_video_frame_tokens, text_hidden): each frame
        encoded as an image (`vision_batch_size` frames at a time), its token grid average-pooled by
        ``config.video_frame_pool`` per side."""
        connector_dtype = next(self.connector.parameters()).dtype
        batch, layer = self.config.vision_batch_size, self.config.vision_feature_layer
        # Only the projections are kept (not the vision features get_image_features also returns): at 256 frames
        # that is a few hundred MB less at the peak.
        features = torch.cat([self._encode(pixel_values_videos[start:start + batch], layer, connector_dtype)[1]
                              for start in range(0, pixel_values_videos.shape[0], batch)], dim=0)
        pool = self.config.video_frame_pool
        if pool == 1:
            return features
        frames, tokens, hidden = features.shape
        side = math.isqrt(tokens)
        grid = features.transpose(1, 2).reshape(frames, hidden, side, side)
        pooled = nn.functional.avg_pool2d(grid.float(), pool, stride=pool, ceil_mode=True).to(features.dtype)
        return pooled.flatten(2).transpose(1, 2)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """Mask of `<image>` positions, (batch, seq, hidden), and with ``video_features`` a second one of the video
        frame tokens; checks that their numbers match the features."""
        masks = []
        for kind, token_id, features, per_item in (
                ("image", self.config.image_token_id, image_features, "num_image_tokens"),
                ("video", self.config.video_token_id, video_features, "num_video_frame_tokens")):
            if kind == "video" and video_features is None:
                continue
            if token_id is None:
                raise ValueError(f"config.{kind}_token_id is not set: set it to the processor's `{kind}_token_id`.")
            if input_ids is None:
                embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
                found = (inputs_embeds == embedding).all(-1)
            else:
                found = input_ids == token_id
            if features is not None:
                per_sample = found.sum(-1).tolist()
                count, tokens = features.shape[:2]
                if sum(per_sample) != count * tokens:
                    raise ValueError(
                        f"{kind.capitalize()} features and {kind} tokens do not match: the input holds "
                        f"{sum(per_sample)} `<{kind}>` tokens (per sample: {per_sample}) but {count} "
                        f"{'image' if kind == 'image' else 'frame'}(s) x {tokens} tokens = {count * tokens} features. "
                        f"Expand each placeholder to config.{per_item}={getattr(self.config, per_item)} tokens "
                        f"(MLMambaProcessor does this) and pass one {kind} per placeholder.")
            masks.append(found.unsqueeze(-1).expand_as(inputs_embeds))
        return masks[0] if video_features is None else tuple(masks)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_params: Cache | None = None,
        past_key_values: Cache | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MLMambaModelOutput:
        cache = pick_cache(cache, cache_params, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, return_dict=True).pooler_output
            image_features = image_features.to(inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
        if pixel_values_videos is not None:
            video_features = self.get_video_features(pixel_values_videos).to(inputs_embeds.dtype)
            _, mask = self.get_placeholder_mask(input_ids, inputs_embeds, None, video_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, video_features)
            del video_features, mask  # a long video's features are as large as its embeddings: free them now
        if input_ids is not None and not _is_decoding(cache):
            for token_id, given, name in ((self.config.image_token_id, pixel_values, "pixel_values"),
                                          (self.config.video_token_id, pixel_values_videos, "pixel_values_videos")):
                count = int((input_ids == token_id).sum()) if token_id is not None and given is None else 0
                if count:
                    kind = "image" if name == "pixel_values" else "video"
                    raise ValueError(f"The input holds {count} `<{kind}>` tokens but no `{name}` were given.")

        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if attention_mask is not None and _is_decoding(cache) and attention_mask.shape[1] > inputs_embeds.shape[1]:
            # `generate` passes the mask of the whole sequence; the recurrent state already holds the past, and the
            # LM masks the new tokens only (transformers' Mamba-1 would broadcast a longer mask over them).
            attention_mask = attention_mask[:, -inputs_embeds.shape[1]:]
        seq_idx = _packed_seq_idx(kwargs.get("seq_idx"), kwargs.get("position_ids"))
        if seq_idx is not None:  # packed samples (padding-free training): each starts from a fresh state
            if self.config.text_config.model_type != "mamba2":
                raise ValueError("Packed sequences (seq_idx / position_ids restarting at 0) need a Mamba-2 language "
                                 f"model; this one is {self.config.text_config.model_type!r}.")
            if cache is not None and cache.has_previous_state(0):
                raise ValueError("Packed sequences cannot continue a cache: pass them without one.")
            outputs = self.language_model(inputs_embeds=inputs_embeds, use_cache=False, attention_mask=attention_mask,
                                          output_hidden_states=bool(output_hidden_states), return_dict=True,
                                          seq_idx=seq_idx)
        elif self.config.text_config.model_type == "mamba" and _is_decoding(cache) and inputs_embeds.shape[1] > 1:
            # Several new tokens on top of a Mamba-1 state (a conversation's next turn), one step each:
            # transformers' Mamba-1 prefill restarts its causal conv from zeros instead of the cached window
            # (Mamba-2's path continues both), so stepping is the exact way; one decode step per new token.
            outputs = self._language_model_in_pieces(inputs_embeds, attention_mask, cache, 1, output_hidden_states)
        elif self._prefills_in_segments(inputs_embeds, output_hidden_states):
            # It holds one segment's activations instead of each layer's output over the whole prompt (three tensors
            # of tokens x hidden), e.g. 1.7 GB less at 186,648 tokens of hidden 768. Same outputs (tests/test_video.py).
            size = equal_part_length(inputs_embeds.shape[1], self.lm_prefill_segment)  # no single-token segment
            outputs = self._language_model_in_pieces(inputs_embeds, attention_mask, cache, size)
            if use_cache is False:
                setattr(outputs, CACHE_NAME, None)
        else:  # No **kwargs: transformers' Mamba models pass them on to their mixer kernels.
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                output_hidden_states=bool(output_hidden_states),
                attention_mask=attention_mask,
                return_dict=True,
                **{CACHE_NAME: cache},
            )
        output = MLMambaModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=_select_layers(outputs.hidden_states, output_hidden_states),
            image_hidden_states=image_features,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()

    def _prefills_in_segments(self, inputs_embeds, output_hidden_states) -> bool:
        """A Mamba-2 prefill without gradients on the CPU fast path, longer than `lm_prefill_segment` tokens: the LM
        then runs `lm_prefill_segment` tokens (or fewer, in equal segments) at a time."""
        return (inputs_embeds.shape[1] > self.lm_prefill_segment and not output_hidden_states
                and not torch.is_grad_enabled() and inputs_embeds.device.type == "cpu"
                and self.config.text_config.model_type == "mamba2" and getattr(self.config, "use_fast_cpu_path", True))

    def _language_model_in_pieces(self, inputs_embeds, attention_mask, cache, size: int,
                                  output_hidden_states=False):
        """The LM over ``inputs_embeds`` ``size`` tokens at a time, every layer per piece, the cache carrying the
        conv windows and states from one piece to the next (as a conversation's next turn does)."""
        pieces = []
        for start in range(0, inputs_embeds.shape[1], size):
            mask = attention_mask[:, start:start + size] if attention_mask is not None else None
            piece = self.language_model(inputs_embeds=inputs_embeds[:, start:start + size], use_cache=True,
                                        output_hidden_states=bool(output_hidden_states), attention_mask=mask,
                                        return_dict=True, **{CACHE_NAME: cache})
            cache = getattr(piece, CACHE_NAME)
            pieces.append(piece)
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*(p.hidden_states for p in pieces)))
        return SimpleNamespace(last_hidden_state=torch.cat([p.last_hidden_state for p in pieces], dim=1),
                               hidden_states=hidden_states, **{CACHE_NAME: cache})


def _packed_seq_idx(seq_idx, position_ids):
    """``seq_idx`` (b, l) of packed samples: given, or from ``position_ids`` that restart at 0 inside a row (TRL's
    padding-free batches); None for ordinary rows."""
    if seq_idx is not None:
        return seq_idx.to(torch.int32)
    if position_ids is None or position_ids.dim() != 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    return ((position_ids == 0).cumsum(-1) - 1).to(torch.int32)


def _return_dict(return_dict: bool | None, config) -> bool:
    """transformers' convention: the argument, else ``config.return_dict`` (True unless set otherwise)."""
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


def _select_layers(hidden_states, requested):
    """transformers' ``output_hidden_states=[indices]`` (5.25): keep the listed layers (negative ones count from the
    end), ``None`` in the others; ``True`` keeps all."""
    if hidden_states is None or not isinstance(requested, (list, tuple)):
        return hidden_states
    kept = {index % len(hidden_states) for index in requested}
    return tuple(h if i in kept else None for i, h in enumerate(hidden_states))


def _is_decoding(cache: Cache | None) -> bool:
    """True once the recurrent cache holds a state, i.e. after prefill (a generated `<image>` id is then just text)."""
    return cache is not None and cache.has_previous_state(0)


def _unseen_images(pixel_values, input_ids, seen: int, image_token_id: int, tokens_per_image: int):
    """The rows of ``pixel_values`` (the images of every sequence, in order) whose `<image>` tokens come after the
    first ``seen`` positions of ``input_ids``; None if there are none."""
    keep, offset = [], 0
    for row in input_ids:
        before = int((row[:seen] == image_token_id).sum())
        total = int((row == image_token_id).sum())
        if before % tokens_per_image:
            raise ValueError(f"The cache has seen {before % tokens_per_image} of the {tokens_per_image} tokens of an "
                             "image: continue a conversation from a cache that ends between turns.")
        keep.extend(range(offset + before // tokens_per_image, offset + total // tokens_per_image))
        offset += total // tokens_per_image
    return pixel_values[keep] if keep else None


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin):
    """ML-Mamba with its LM head: the class to load, fine-tune and `generate` with.

    ```python
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    >>> messages = [{"role": "user", "content": [{"type": "image", "image": image},
    ...                                          {"type": "text", "text": "Which digit is shown?"}]}]
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True, return_tensors="pt")
    >>> output = model.generate(**inputs, max_new_tokens=8)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor, vision_feature_layer: int | None = None,
                           output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        return self.model.get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                             output_hidden_states=output_hidden_states, return_dict=return_dict)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_params: Cache | None = None,
        past_key_values: Cache | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MLMambaCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): next-token targets (shifted inside);
            -100 and `<image>` positions are ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `n` positions (0 = all).
        """
        cache = pick_cache(cache, cache_params, past_key_values)
        if pixel_values_videos is None and self._decodes_statically(input_ids, inputs_embeds, pixel_values, cache,
                                                                    labels, output_hidden_states):
            logits = self._static_decoder()(input_ids, cache)[:, None]
            output = MLMambaCausalLMOutput(logits=logits, **{CACHE_NAME: cache})
            return output if _return_dict(return_dict, self.config) else output.to_tuple()
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            pixel_values_videos=pixel_values_videos,
            **{name: kwargs[name] for name in ("seq_idx", "position_ids") if kwargs.get(name) is not None},
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep].to(input_dtype(self.lm_head))).float()

        loss = None
        if labels is not None:
            if self.config.image_token_id is not None:
                labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        output = MLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()


    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' preparation; when `generate` continues from a cache that has seen the start of the prompt
        (a conversation's next turn, ``past_key_values=previous.past_key_values``), it feeds only the tokens after
        that start, and the images whose tokens lie inside it are dropped from ``pixel_values`` (the state holds
        them)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        fed = model_inputs.get("input_ids")
        if fed is None or fed.shape[1] >= input_ids.shape[1]:
            return model_inputs
        for name, token_id, per_item in (("pixel_values", self.config.image_token_id, "num_image_tokens"),
                                         ("pixel_values_videos", self.config.video_token_id, "num_video_frame_tokens")):
            if model_inputs.get(name) is not None:
                model_inputs[name] = _unseen_images(model_inputs[name], input_ids, input_ids.shape[1] - fed.shape[1],
                                                    token_id, getattr(self.config, per_item))
        return model_inputs

    def _decodes_statically(self, input_ids, inputs_embeds, pixel_values, cache, labels, output_hidden_states) -> bool:
        """A cached one-token step of `generate` (no gradients, hidden states, labels or images) takes the static
        decode step unless ``config.decode_implementation == "eager"``."""
        implementation = getattr(self.config, "decode_implementation", "static")
        if implementation == "eager" or torch.is_grad_enabled() or input_ids is None or input_ids.shape[1] != 1:
            return False
        if inputs_embeds is not None or pixel_values is not None or labels is not None:
            return False
        if output_hidden_states or (output_hidden_states is None and self.config.output_hidden_states):
            return False
        return can_decode_statically(self.model.language_model, cache)

    def _static_decoder(self) -> StaticDecoder:
        """The decoder for ``config.decode_implementation`` (built once, rebuilt when the setting changes)."""
        implementation = getattr(self.config, "decode_implementation", "static")
        built = self.__dict__.get("_decoder")  # (implementation, decoder); not a submodule: it only refers to ours
        if built is None or built[0] != implementation:
            decoder = StaticDecoder(self.model.language_model, self.lm_head, self.config.text_config.model_type,
                                    compiled=implementation == "compiled", graph=implementation == "graph")
            built = self.__dict__["_decoder"] = (implementation, decoder)
        return built[1]


__all__ = ["MLMambaPreTrainedModel", "MLMambaModel", "MLMambaForConditionalGeneration"]
