"""Chatbots: a conversation on top of a PrimeModel."""

from jarvis.chatbots.chatbot import DEFAULT_MODEL, DEFAULT_PERSONA, Chatbot, ChatbotConfig, Thought, ToolUse

__all__ = ["DEFAULT_MODEL", "DEFAULT_PERSONA", "Chatbot", "ChatbotConfig", "Thought", "ToolUse"]
