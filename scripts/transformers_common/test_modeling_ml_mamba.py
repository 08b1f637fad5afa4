"""A tiny ML-Mamba (SigLIP -> MLP connector -> Mamba-2 or Mamba-1) under transformers' `ModelTesterMixin` and
`ConfigTester`; copied into the transformers source tree by `run.sh`."""

import unittest

import torch

from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaModel

from ...test_configuration_common import ConfigTester
from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor


class MLMambaModelTester:
    def __init__(self, parent, text="mamba2", batch_size=3, seq_length=7, is_training=True):
        self.parent = parent
        self.text = text
        self.batch_size = batch_size
        self.text_seq_length = seq_length
        self.is_training = is_training
        self.image_token_id = 3
        self.image_size = 16
        self.patch_size = 8
        self.num_image_tokens = (self.image_size // self.patch_size) ** 2  # mlp connector: 4
        self.seq_length = seq_length + self.num_image_tokens
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.vision_config = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=37,
                                  num_hidden_layers=2, num_attention_heads=4, image_size=self.image_size,
                                  patch_size=self.patch_size)
        if text == "mamba2":
            self.text_config = dict(model_type="mamba2", hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                    state_size=8, n_groups=1, expand=2, chunk_size=8, vocab_size=99,
                                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
        else:
            self.text_config = dict(model_type="mamba", hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                    vocab_size=99, pad_token_id=1, bos_token_id=0, eos_token_id=2)

    def get_config(self):
        return MLMambaConfig(vision_config=self.vision_config, text_config=self.text_config, connector_type="mlp",
                             image_token_id=self.image_token_id, image_size=self.image_size)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        input_ids = ids_tensor([self.batch_size, self.text_seq_length], self.vocab_size - 4) + 4
        image_ids = torch.full((self.batch_size, self.num_image_tokens), self.image_token_id, dtype=torch.long)
        input_ids = torch.cat([image_ids, input_ids], dim=1)
        attention_mask = torch.ones_like(input_ids)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

# What a built-in model gets from transformers' own tables (a remote-code model is only in the registered mappings).
MODEL_MAPPING_NAMES["ml_mamba"] = "MLMambaModel"
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["ml_mamba"] = "MLMambaForConditionalGeneration"


class _Base(ModelTesterMixin):
    all_model_classes = (MLMambaModel, MLMambaForConditionalGeneration)
    has_attentions = False
    _is_composite = True
    test_resize_embeddings = True
    test_torch_exportable = False
    test_can_init_all_missing_weights_before_2023 = True
    text = "mamba2"

    def setUp(self):
        self.model_tester = MLMambaModelTester(self, text=self.text)
        self.config_tester = ConfigTester(self, config_class=MLMambaConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()


class MLMambaMamba2Test(_Base, unittest.TestCase):
    text = "mamba2"


class MLMambaMamba1Test(_Base, unittest.TestCase):
    text = "mamba"
