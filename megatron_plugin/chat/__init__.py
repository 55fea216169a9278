"""Chat: the conversation template and its control tokens (`megatron_plugin.chat.template`)."""
from .template import (
    CONTROL_TOKENS,
    IM_END,
    IM_START,
    JINJA_TEMPLATE,
    TEMPLATE_ID,
    TEMPLATE_VERSION,
    ChatTemplateError,
    ChatTokenizer,
    ConversationError,
    EncodedConversation,
    Message,
    check_messages,
    control_token_ids,
    render_text,
)

__all__ = [
    "CONTROL_TOKENS", "IM_END", "IM_START", "JINJA_TEMPLATE", "TEMPLATE_ID", "TEMPLATE_VERSION",
    "ChatTemplateError", "ChatTokenizer", "ConversationError", "EncodedConversation", "Message",
    "check_messages", "control_token_ids", "render_text",
]
