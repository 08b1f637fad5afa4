"""Save every architecture Hub-style and load it in a fresh offline process that cannot import this package:
bit-identical logits and generated tokens through each Auto class, and the image-text-to-text pipeline. Part of the
`compat` subset that CI also runs on the oldest supported transformers. Budget: ~60 s."""

import json
import os

import numpy as np
import torch
import transformers
from utils import digit_images, run_without_package, tiny_model

VARIANTS = [("mlp", "mamba2", "siglip"), ("fused-mlp", "mamba", "fused"), ("ldp", "mamba2", "clip"),
            ("msc", "mamba2", "fused"), ("msc", "mamba", "dinov2"), ("vss-l2", "mamba2", "siglip"),
            ("vss-l2", "mamba", "siglip")]


def test_saved_folders_load_without_the_package_and_match_bit_for_bit(tmp_path):
    images = digit_images(2)
    folders = []
    for index, (connector, text, vision) in enumerate(VARIANTS):
        scan = "cross" if index % 2 else "bidirectional"
        model, processor = tiny_model(connector, text, vision, seed=index, connector_scan=scan)
        folder = tmp_path / f"{connector}-{text}-{vision}"
        # a tiny shard size forces the sharded layout (index + several safetensors files) for one of them
        model.save_pretrained(folder, max_shard_size="200KB" if index == 3 else "50GB")
        processor.save_pretrained(folder)
        inputs = processor(images=images, text=["<image>Which digit?", "Is <image> odd?"], padding=True,
                           return_tensors="pt")
        with torch.no_grad():
            np.save(folder / "expected_logits.npy", model(**inputs).logits.numpy())
        np.save(folder / "expected_tokens.npy",
                model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False).numpy())
        folders.append(str(folder))
        files = set(os.listdir(folder))
        assert {"config.json", "configuration_ml_mamba.py", "modeling_ml_mamba.py", "processing_ml_mamba.py",
                "chat_template.jinja", "tokenizer.json", "processor_config.json"} <= files
        assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
        assert ("model.safetensors.index.json" in files) == (index == 3)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageTextToText"] == "modeling_ml_mamba.MLMambaForConditionalGeneration"

    output = run_without_package(f"""
        import numpy as np, torch, transformers
        from PIL import Image
        print("transformers", transformers.__version__)
        from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor, pipeline)
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = [Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8), mode="L").resize((32, 32))
                  .convert("RGB") for i in range(2)]
        for folder in {folders!r}:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            inputs = processor(images=images, text=["<image>Which digit?", "Is <image> odd?"], padding=True,
                               return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits.numpy()
            assert np.array_equal(logits, np.load(folder + "/expected_logits.npy")), folder
            tokens = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False).numpy()
            assert np.array_equal(tokens, np.load(folder + "/expected_tokens.npy")), folder
            assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "MLMambaModel"
            assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__ == \\
                "MLMambaForConditionalGeneration"
            print("identical", folder, type(model).__module__)
        pipe = pipeline("image-text-to-text", model={folders[0]!r}, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "image", "image": images[0]}},
                                                 {{"type": "text", "text": "Which digit is shown?"}}]}}]
        single = pipe(text=messages, max_new_tokens=4, return_full_text=False)
        batch = pipe(text=[messages, messages], max_new_tokens=4, batch_size=2, return_full_text=False)
        assert isinstance(single[0]["generated_text"], str)
        assert [b[0]["generated_text"] for b in batch] == [single[0]["generated_text"]] * 2
        print("pipeline answered", repr(single[0]["generated_text"]))
    """, cwd=str(tmp_path))
    assert output.count("identical") == len(VARIANTS)
    assert f"transformers {transformers.__version__}" in output  # the release under test, also in the fresh process
    assert "transformers_modules" in output and "pipeline answered" in output
