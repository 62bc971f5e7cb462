"""The ``transformers`` config vLLM reads a Phantom ``config.json`` with.

Our checkpoints (``phantom_ray.model.loading.save_pretrained``) and the released ones carry
``model_type: phantom`` with nested ``llm_config`` / ``vision_config`` dicts. vLLM sizes its KV
cache and context from ``get_text_config()``; that text config describes the attention as vLLM
sees it: heads widened to 2D by the phantom branch (``head_dim = 2 * hidden/heads``).
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from phantom_ray.model.config import PhantomConfig


class PhantomHFConfig(PretrainedConfig):
    model_type = "phantom"

    def __init__(self, llm_config: dict | None = None, vision_config: dict | None = None, **kwargs):
        raw = {k: copy.deepcopy(v) for k, v in kwargs.items() if not k.startswith("_")}
        raw.update(llm_config=copy.deepcopy(llm_config), vision_config=copy.deepcopy(vision_config))
        # keep every field of the file: PhantomConfig is the one parser of it
        self.phantom = {k: v for k, v in raw.items() if k not in _HF_ONLY}
        super().__init__(**{k: v for k, v in kwargs.items() if k in _HF_PASS})
        if llm_config is None:  # transformers builds an empty instance for defaults/diffs
            self.text_config = PretrainedConfig()
            return
        pc = self.phantom_config()
        llm = pc.llm_config
        D = llm.head_dim
        self.text_config = PretrainedConfig(
            hidden_size=llm.hidden_size,
            num_attention_heads=llm.num_attention_heads,
            num_key_value_heads=llm.num_key_value_heads,
            head_dim=2 * D,  # the phantom-widened head vLLM's KV cache stores
            num_hidden_layers=llm.num_hidden_layers,
            vocab_size=llm.vocab_size,
            max_position_embeddings=llm.max_position_embeddings,
            rms_norm_eps=llm.rms_norm_eps,
            tie_word_embeddings=llm.tie_word_embeddings,
        )
        self.text_config.architectures = ["PhantomTextModel"]
        self.image_token_index = pc.image_token_index
        self.tie_word_embeddings = llm.tie_word_embeddings

    def phantom_config(self) -> PhantomConfig:
        return PhantomConfig.from_dict(copy.deepcopy(self.phantom))

    def get_text_config(self, *args, **kwargs):
        # transformers validates token ids from inside __init__, before text_config exists
        return self.__dict__.get("text_config", self)


# transformers' own bookkeeping fields: not part of the Phantom config
_HF_ONLY = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map",
            "name_or_path", "return_dict", "output_hidden_states", "output_attentions", "is_composition",
            "text_config", "phantom", "tie_word_embeddings_", "chunk_size_feed_forward", "id2label", "label2id",
            "problem_type", "tokenizer_class"}
_HF_PASS = {"architectures", "torch_dtype", "dtype", "name_or_path"}
