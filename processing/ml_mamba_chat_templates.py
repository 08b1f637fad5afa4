"""Chat templates shipped with `MLMambaProcessor`.

``ZEPHYR_CHAT_TEMPLATE`` is the default: the Zephyr format Cobra and ML-Mamba were trained with
(``<|user|>\\n{message}<|endoftext|>\\n<|assistant|>\\n{answer}<|endoftext|>``, later turns start with ``\\n``).
Each ``{"type": "image"}`` item becomes one ``<image>`` placeholder where it stands in the message, so the image can
come first (as in Cobra/ML-Mamba) or anywhere; each ``{"type": "video"}`` item one ``<video>`` placeholder (the
processor expands it to the sampled frames). The assistant's answer and its end-of-turn token are wrapped in
``{% generation %}`` so TRL's ``assistant_only_loss=True`` trains on them alone.
"""

_CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<video>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)

ZEPHYR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}" + _CONTENT + "{{ '<|endoftext|>' }}{% endgeneration %}"
    "{%- else -%}" + _CONTENT + "{{ '<|endoftext|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages -%}{{ '\n' }}{%- endif -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
