"""Conversations and preference pairs: rows checked, normalised and rendered with a chat template.

A conversation is rendered once in full, and cut into pieces at the turns the model must learn to
write: an assistant turn starts where the render of the turns before it, with the generation prompt,
ends (so what is learnt is exactly what generation must add after the prompt it is given) and ends
where the render of the conversation up to it ends (its end-of-turn token included, whitespace after
that token left out). Each piece is tokenized on its own, so the label boundaries are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from swarmtune.errors import UserError

# OpenAI's role names, and ShareGPT's (human, gpt) for the same roles
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


class RowError(ValueError):
    """A malformed row; the message names the field."""


Messages = list[dict[str, str]]


def messages(value, where: str) -> Messages:
    """`value` as a list of {role, content}: OpenAI-style ({role, content}) or ShareGPT-style ({from, value})."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{where} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{where}[{i}] is not a message (a mapping with role and content)")
        role_key, content_key = ("from", "value") if message.get("role") is None and "from" in message \
            else ("role", "content")
        role, content = message.get(role_key), message.get(content_key)
        if role is None:
            raise RowError(f"{where}[{i}] has no '{role_key}'")
        if role not in ROLES:
            raise RowError(f"{where}[{i}].{role_key} is {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{where}[{i}] has no '{content_key}' text")
        out.append({"role": ROLES[role], "content": content})
    return out


def conversation(row: dict) -> Messages:
    """A `messages` row (OpenAI) or a `conversations` row (ShareGPT)."""
    if row.get("messages") is not None:
        return messages(row["messages"], "messages")
    if row.get("conversations") is not None:
        return messages(row["conversations"], "conversations")
    raise RowError("no 'messages' (nor ShareGPT's 'conversations')")


@dataclass
class Pair:
    """A preference pair: the prompt, and the chosen and rejected answers that follow it. Plain text (strings)
    or conversations (message lists), never a mix."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def pair(row: dict) -> Pair:
    """{prompt, chosen, rejected}, each a string or a list of messages. Answers given as whole conversations
    (as in ultrafeedback_binarized) share their first messages: those are the prompt; an answer that starts
    with the prompt's messages is what follows them."""
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise RowError(f"no '{name}'")
        if not isinstance(row[name], (str, list)):
            raise RowError(f"'{name}' must be a string or a list of messages")
    chosen, rejected = (messages(row[n], n) if isinstance(row[n], list) else row[n] for n in ("chosen", "rejected"))
    prompt = row.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = _shared_start(chosen, rejected)
        if shared:
            return Pair(chosen[:shared], _answer(chosen[shared:], "chosen"), _answer(rejected[shared:], "rejected"))
    if prompt is None:
        raise RowError("no 'prompt'")
    if not isinstance(prompt, (str, list)):
        raise RowError("'prompt' must be a string or a list of messages")
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return Pair(prompt, chosen, rejected)
    prompt = messages(prompt, "prompt") if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    answers = [[{"role": "assistant", "content": a}] if isinstance(a, str)
               else a[len(prompt):] if a[:len(prompt)] == prompt else a for a in (chosen, rejected)]
    return Pair(prompt, _answer(answers[0], "chosen"), _answer(answers[1], "rejected"))


def _shared_start(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _answer(answer: Messages, name: str) -> Messages:
    if not any(m["role"] == "assistant" for m in answer):
        raise RowError(f"'{name}' has no assistant message after the prompt")
    return answer


# ---- rendering ---------------------------------------------------------------------------------------


def render(tokenizer: PreTrainedTokenizerBase, conversation: Messages, generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} has no chat template to render conversations "
                        "with: give one with data.chat_template=FILE (a jinja file)")
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)


def pieces(tokenizer: PreTrainedTokenizerBase, conversation: Messages, first: int = 0) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, learnt) pieces: the assistant turns from message `first` on are
    learnt, the rest is context."""
    text = render(tokenizer, conversation)
    out, done = [], 0
    for i, message in enumerate(conversation):
        if message["role"] != "assistant" or i < first:
            continue
        start = len(_prefix(tokenizer, conversation[:i], True, text))
        turn = _prefix(tokenizer, conversation[:i + 1], False, text)
        end = len(turn.rstrip()) if turn[start:].strip() else len(turn)
        out += [(text[done:start], False), (text[start:end], True)]
        done = end
    out.append((text[done:], False))
    return [(piece, learnt) for piece, learnt in out if piece]


def _prefix(tokenizer: PreTrainedTokenizerBase, head: Messages, generation_prompt: bool, text: str) -> str:
    rendered = render(tokenizer, head, generation_prompt) if head or generation_prompt else ""
    if not text.startswith(rendered):
        raise RowError("the chat template renders the first turns of a conversation differently once more turns "
                       "follow, so the assistant turns cannot be found: give data.chat_template=FILE")
    return rendered
