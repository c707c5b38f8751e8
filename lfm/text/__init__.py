"""Text side of lfm: tokenizer, chat templates, streaming detokenization and tool-call parsing."""

from lfm.text.chat_template import ChatTemplateError, RenderedChat, compile_template, render_chat_template
from lfm.text.detokenizer import IncrementalDetokenizer
from lfm.text.templates import TEMPLATES
from lfm.text.tiny_tokenizer import SPECIAL_TOKENS, TINY_VOCAB_SIZE, build_tiny_tokenizer
from lfm.text.tokenizer import ChatEncoding, Tokenizer, TokenizerError
from lfm.text.tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolCall, new_call_id, parse_tool_calls

__all__ = [
    "ChatEncoding",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "RenderedChat",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "TINY_VOCAB_SIZE",
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "Tokenizer",
    "TokenizerError",
    "ToolCall",
    "build_tiny_tokenizer",
    "compile_template",
    "new_call_id",
    "parse_tool_calls",
    "render_chat_template",
]
