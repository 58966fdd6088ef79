"""The tiny models' tokenizers as the released checkpoints set them up: special tokens, the named ones a processor
reads (Gemma 3's `boi_token`, ...), end-of-turn and padding tokens, and each family's chat template."""

from __future__ import annotations

from dataclasses import dataclass, field

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen3's text markers: added tokens that are not special (decoding keeps them), as in the released tokenizers
QWEN3_MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


@dataclass(frozen=True)
class ChatSpec:
    special: tuple[str, ...]           # the tokenizer's special tokens (the first is not an "extra" one)
    eos: str                           # the tokenizer's eos_token
    pad: str
    stop: tuple[str, ...]              # what ends a generated answer (the generation config's eos ids)
    template: str = ""                 # "" : demo.chat_template of the family's image/video text (ChatML)
    bos: str | None = None
    named: dict = field(default_factory=dict)  # tokenizer attributes a processor reads -> token
    image_text: str = ""               # what the ChatML template writes for an image, where the adapter has none

    def ids(self, tokenizer) -> dict[str, int]:
        return {t: tokenizer.convert_tokens_to_ids(t) for t in self.special}


QWEN = ChatSpec(QWEN_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", stop=("<|im_end|>",))

# google/gemma-3-*-it: a system turn is folded into the first user turn, the assistant's role is `model`, text is
# trimmed, an image is written as <start_of_image> (the processor expands it), every turn ends <end_of_turn>\n.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
GEMMA3 = ChatSpec(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"), eos="<eos>", pad="<pad>", bos="<bos>",
                  stop=("<end_of_turn>", "<eos>"), template=GEMMA3_TEMPLATE,
                  named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                         "image_token": "<image_soft_token>"})

# llava-hf/llava-onevision-qwen2-*-ov-hf: Qwen's ChatML with the processor's <image> (expanded by the processor to
# the anyres grid's tokens), its <image>/<video> named on the tokenizer
LLAVA_ONEVISION = ChatSpec(QWEN_SPECIAL_TOKENS + ("<image>", "<video>"), eos="<|im_end|>", pad="<|endoftext|>",
                           stop=("<|im_end|>",), named={"image_token": "<image>", "video_token": "<video>"})

# mistralai/Mistral-Small-3.1-*-Instruct (llava-hf layout, Mistral3): <s>, then [INST]...[/INST] per user turn,
# the answer closed by </s>; an image written as [IMG], which the processor expands to the image's own patch grid
# ([IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END] at the end)
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '[IMG]' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)
MISTRAL3 = ChatSpec(("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                     "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"), eos="</s>", pad="<pad>", bos="<s>",
                    stop=("</s>",), template=MISTRAL3_TEMPLATE)

# OpenGVLab/InternVL3-*-hf: Qwen's ChatML, an image written as <IMG_CONTEXT>\n, which the processor expands to
# <img> + <IMG_CONTEXT> per token of every tile (and the thumbnail) + </img>
INTERNVL = ChatSpec(QWEN_SPECIAL_TOKENS + ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), eos="<|im_end|>",
                    pad="<|endoftext|>", stop=("<|im_end|>",), image_text="<IMG_CONTEXT>\n",
                    named={"start_image_token": "<img>", "end_image_token": "</img>",
                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})

# HuggingFaceTB/SmolVLM2-*-Instruct (Idefics3 layout): <|im_start|> once, then `User:` / `Assistant:` turns each
# closed by <end_of_utterance>\n, an image written as <image>, which the processor expands to its grid of tiles (each
# <fake_token_around_image><row_r_col_c> + the tile's <image> tokens, a newline after each row of tiles) and the global
# image (<fake_token_around_image><global-img> + its <image> tokens + <fake_token_around_image>); the row/column markers
# are special tokens of their own (up to 6 x 6 tiles)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TILES = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
SMOLVLM = ChatSpec(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
                    "<image>", "<global-img>", "<video>") + SMOLVLM_TILES, eos="<end_of_utterance>", pad="<|im_end|>",
                   bos="<|im_start|>", stop=("<end_of_utterance>",), template=SMOLVLM_TEMPLATE,
                   named={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                          "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>",
                          "video_token": "<video>"})

# HuggingFaceM4/Idefics3-8B-Llama3: SmolVLM's layout before SmolVLM (Llama 3's <|begin_of_text|> once, `User:` /
# `Assistant:` turns closed by <end_of_utterance>\n, the same image tokens); its template reads every turn as typed
# parts (`content[0]['type']`), so a turn given as a plain string renders with its text dropped
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3 = ChatSpec(("<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>",
                     "<image>", "<global-img>") + SMOLVLM_TILES, eos="<end_of_utterance>", pad="<|end_of_text|>",
                    bos="<|begin_of_text|>", stop=("<end_of_utterance>", "<|end_of_text|>"),
                    template=IDEFICS3_TEMPLATE,
                    named={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                           "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"})

# zai-org/GLM-4.6V(-Flash): [gMASK]<sop> once, then <|system|> / <|user|> / <|assistant|> turns each opened by its
# role token and "\n", an image written as <|begin_of_image|><|image|><|end_of_image|> (the processor expands
# <|image|> to one per merged patch), an answer after an empty <think></think> block (thinking off), and no end of
# turn, as released (generation stops at <|user|>, <|observation|> or <|endoftext|>): the adapter's answer_stops
# make the encoder learn the stop (the next <|user|>, or <|endoftext|> appended at the end).
GLM46V_TEMPLATE = (
    "[gMASK]<sop>{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}{{ '<think></think>\n' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|begin_of_video|><|video|><|end_of_video|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n<think></think>\n' }}{%- endif -%}"
)
GLM46V = ChatSpec(("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                   "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                   "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>"),
                  eos="<|endoftext|>", pad="<|endoftext|>", stop=("<|endoftext|>", "<|user|>", "<|observation|>"),
                  template=GLM46V_TEMPLATE, named={"image_token": "<|image|>", "video_token": "<|video|>"})

# google/gemma-4-*-it: <bos>, then turns <|turn>role\n ... <turn|>\n (system, user, model), an image written as
# <|image|>, which the processor expands to <|image> + a soft <|image|> per pooled patch + <image|>; thinking off:
# the generation prompt is <|turn>model\n. The audio and video tokens are named on the tokenizer as released (the
# processor reads boa/eoa even without audio).
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)
GEMMA4 = ChatSpec(("<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>",
                   "<audio|>", "<|audio|>", "<|video|>", "<|think|>", "<|channel>", "<channel|>"),
                  eos="<eos>", pad="<pad>", bos="<bos>", stop=("<turn|>", "<eos>"), template=GEMMA4_TEMPLATE,
                  named={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                         "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"})

CHATS = {"gemma3": GEMMA3, "llava_onevision": LLAVA_ONEVISION, "mistral3": MISTRAL3, "internvl": INTERNVL,
         "smolvlm": SMOLVLM, "idefics3": IDEFICS3, "glm46v": GLM46V, "gemma4": GEMMA4}


def chat_of(family: str) -> ChatSpec:
    return CHATS.get(family, QWEN)
