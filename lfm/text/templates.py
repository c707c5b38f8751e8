"""Our own LFM2 and LFM2.5 style chat templates (Jinja), used by the tiny test tokenizer.

Real checkpoints ship their own template and we render that one; these exist so tests exercise both template
generations (tool list tokens vs plain JSON tool list, tool-response tokens vs plain tool turns, `<think>`
stripping, `{% generation %}` blocks, `raise_exception`, `strftime_now`) without downloading anything.
Every layout line sits inside a whitespace-trimming tag, so indentation never leaks into the output.
"""

from __future__ import annotations

# Shared macros: message content as text, and OpenAI-style `tool_calls` as an LFM tool-call block.
_MACROS = r"""
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is sequence and content and content[0] is mapping and "type" in content[0] -%}
        {%- for part in content -%}
            {%- if part.type == "text" -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is defined and content is not none -%}
        {{- content | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro tool_calls_of(calls) -%}
    {{- "<|tool_call_start|>[" -}}
    {%- for call in calls -%}
        {%- set fn = call.function if call.function is defined else call -%}
        {%- if fn.arguments is mapping -%}
            {{- fn.name + "(" -}}
            {%- for key, value in fn.arguments.items() -%}
                {{- key + "=" + (value | tojson) -}}{{- ", " if not loop.last else "" -}}
            {%- endfor -%}
            {{- ")" -}}
        {%- else -%}
            {{- '{"name": ' + (fn.name | tojson) + ', "arguments": ' + (fn.arguments | string) + "}" -}}
        {%- endif -%}
        {{- ", " if not loop.last else "" -}}
    {%- endfor -%}
    {{- "]<|tool_call_end|>" -}}
{%- endmacro -%}
{%- macro tool_listing(tools) -%}
    {%- for tool in tools -%}
        {{- (tool if tool is string else (tool | tojson)) + (", " if not loop.last else "") -}}
    {%- endfor -%}
{%- endmacro -%}
{%- macro check_role(message) -%}
    {%- if message.role not in ["system", "user", "assistant", "tool"] -%}
        {{- raise_exception("Unsupported chat role: " + (message.role | string)) -}}
    {%- endif -%}
{%- endmacro -%}
"""

# LFM2 generation: tools in the system prompt between tool-list tokens, tool results between tool-response tokens.
LFM2_TEMPLATE = _MACROS + r"""
{{- bos_token -}}
{%- set ns = namespace(system="") -%}
{%- if messages and messages[0].role == "system" -%}
    {%- set ns.system = text_of(messages[0].content) -%}
{%- endif -%}
{%- if tools -%}
    {%- set listing = "List of tools: <|tool_list_start|>[" + tool_listing(tools) + "]<|tool_list_end|>" -%}
    {%- set ns.system = ns.system + ("\n" if ns.system else "") + listing -%}
{%- endif -%}
{%- if ns.system -%}
    {{- "<|im_start|>system\n" + ns.system + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and message.role == "system" -%}{%- continue -%}{%- endif -%}
    {{- check_role(message) -}}
    {{- "<|im_start|>" + message.role + "\n" -}}
    {%- if message.role == "assistant" -%}
        {%- generation -%}
            {%- if message.tool_calls -%}{{- tool_calls_of(message.tool_calls) -}}{%- endif -%}
            {{- text_of(message.content) + "<|im_end|>" -}}
        {%- endgeneration -%}
        {{- "\n" -}}
    {%- elif message.role == "tool" -%}
        {{- "<|tool_response_start|>" + text_of(message.content) + "<|tool_response_end|><|im_end|>\n" -}}
    {%- else -%}
        {{- text_of(message.content) + "<|im_end|>\n" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}
"""

# LFM2.5 generation: dated system prompt with a plain JSON tool list, plain tool turns, and `<think>` reasoning
# removed from assistant turns that precede the last user message. `date_string` overrides today's date.
LFM25_TEMPLATE = _MACROS + r"""
{{- bos_token -}}
{%- set ns = namespace(system="", last_user=-1) -%}
{%- for message in messages -%}
    {%- if message.role == "user" -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- if messages and messages[0].role == "system" -%}
    {%- set ns.system = text_of(messages[0].content) -%}
{%- endif -%}
{%- if tools -%}
    {%- set today = date_string if date_string is defined else strftime_now("%Y-%m-%d") -%}
    {%- set header = "Today's date: " + today + "\n\nList of tools: [" + tool_listing(tools) + "]" -%}
    {%- set ns.system = ns.system + ("\n\n" if ns.system else "") + header -%}
{%- endif -%}
{%- if ns.system -%}
    {{- "<|im_start|>system\n" + ns.system + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and message.role == "system" -%}{%- continue -%}{%- endif -%}
    {{- check_role(message) -}}
    {{- "<|im_start|>" + message.role + "\n" -}}
    {%- if message.role == "assistant" -%}
        {%- set content = text_of(message.content) -%}
        {%- if loop.index0 < ns.last_user and "</think>" in content -%}
            {%- set content = content.split("</think>")[-1].lstrip() -%}
        {%- endif -%}
        {%- generation -%}
            {%- if message.tool_calls -%}{{- tool_calls_of(message.tool_calls) -}}{%- endif -%}
            {{- content + "<|im_end|>" -}}
        {%- endgeneration -%}
        {{- "\n" -}}
    {%- else -%}
        {{- text_of(message.content) + "<|im_end|>\n" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}
"""

TEMPLATES: dict[str, str] = {"lfm2": LFM2_TEMPLATE.strip() + "\n", "lfm25": LFM25_TEMPLATE.strip() + "\n"}
