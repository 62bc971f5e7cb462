"""Phantom's prompt as a Jinja chat template, for the tools that build prompts from a checkpoint
(``tokenizer.apply_chat_template``, ``vllm serve``, ``ray.serve.llm``, ``ray.data.llm``).

Rendered and tokenized, the template gives exactly the ids of :class:`PhantomProcessor`
(docs/phantom.md#prompts): the family's turn tokens, no newline between a turn's end token and
the next turn, no BOS, an optional system turn first, alternating user/assistant turns. Images
render as ``<img></img>``, the placeholder the vLLM model declares
(``PhantomVLLMForCausalLM.get_placeholder_str``): vLLM's multimodal processor expands each one to
``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles) + ``</img>`` with our tiling, which is the
processor's layout. A tokenizer alone (Hugging Face) gets that compact form, the ids
``phantom_ray.vllm.inputs.vllm_prompt`` hands vLLM; the processor's ids are it with each
``<img></img>`` expanded.

Message content may be a string (``<image>`` placeholders in user turns mark the images, as for the
processor) or an OpenAI-style list of parts (``{"type": "text", "text": ...}``,
``{"type": "image"}``, ``{"type": "image_url", ...}``); vLLM detects the list form from the loop
over ``message['content']`` and hands images as parts in place, so they stay where the user put them.

The template is generated from ``PROMPT_RULES`` (one source for the processor and the template);
every literal is emitted as a Jinja string expression, so no whitespace control can eat the
template's newlines.
"""

from __future__ import annotations

import json

from phantom_ray.processing.processor import IMAGE_PLACEHOLDER, IMG_END, IMG_START, PROMPT_RULES

#: what an image renders as: vLLM's placeholder for the Phantom model (expanded by its multimodal processor)
IMAGE_MARK = IMG_START + IMG_END


def _lit(s: str) -> str:
    return "{{ " + json.dumps(s) + " }}"


def chat_template(template: str) -> str:
    """The Jinja chat template of a prompt family (``chatml`` or ``phi3``)."""
    if template not in PROMPT_RULES:
        raise ValueError(f"no chat template for {template!r}; expected one of {sorted(PROMPT_RULES)}")
    r = PROMPT_RULES[template]
    mark, ph = json.dumps(IMAGE_MARK), json.dumps(IMAGE_PLACEHOLDER)
    parts = [
        # one message's content: a string, or a list of text/image parts
        "{%- macro render(content, role) -%}",
        "{%- if content is none -%}",
        "{%- elif content is string -%}",
        "{%- if role == 'user' -%}{{ content | replace(" + ph + ", " + mark + ") }}{%- else -%}{{ content }}{%- endif -%}",
        "{%- else -%}",
        "{%- for part in content -%}",
        "{%- if part is string -%}{{ part }}",
        "{%- elif part['type'] == 'text' -%}",
        "{%- if role == 'user' -%}{{ part['text'] | replace(" + ph + ", " + mark + ") }}"
        "{%- else -%}{{ part['text'] }}{%- endif -%}",
        "{%- elif part['type'] in ['image', 'image_url'] -%}",
        "{%- if role != 'user' -%}{{ raise_exception('images are only allowed in user turns') }}{%- endif -%}",
        "{{ " + mark + " }}",
        "{%- else -%}{{ raise_exception('unsupported content part type: ' ~ part['type']) }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set ns = namespace(turn=0) -%}",
        "{%- for message in messages -%}",
        "{%- if loop.first and message['role'] == 'system' -%}",
        _lit(r["system_start"]) + "{{ render(message['content'], 'system') }}" + _lit(r["system_end"] + r["split"]),
        "{%- elif message['role'] == ('user' if ns.turn % 2 == 0 else 'assistant') -%}",
        "{%- if message['role'] == 'user' -%}",
        _lit(r["user_start"]) + "{{ render(message['content'], 'user') }}" + _lit(r["user_end"] + r["split"]),
        "{%- else -%}",
        _lit(r["assistant_start"]) + "{{ render(message['content'], 'assistant') }}" + _lit(r["assistant_end"]),
        "{%- endif -%}",
        "{%- set ns.turn = ns.turn + 1 -%}",
        "{%- else -%}",
        "{{ raise_exception('Phantom chats are an optional system message, then user/assistant turns "
        "alternating from a user turn; got ' ~ message['role'] ~ ' at message ' ~ loop.index0) }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}" + _lit(r["assistant_start"]) + "{%- endif -%}",
    ]
    return "".join(parts)


__all__ = ["IMAGE_MARK", "chat_template"]
