"""What the model sees of a conversation: the one-image rule and fitting into the context window.

Both model families were trained on one image per conversation. When the user sends another image,
the model looks at the newest one only, placed in the turn where it was sent; the text of every
earlier turn is kept. When a conversation outgrows the context window, the oldest turns are dropped
(the image, if its turn goes, moves to the first turn that stays) and the caller is told how many.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vlui.models.base import Message, PreparedPrompt, VisionChatModel

MIN_ANSWER_TOKENS = 256  # room an answer gets before older turns are dropped to make more


class ContextTooLong(ValueError):
    """The newest message alone does not fit; `str(err)` is a sentence for the user."""


@dataclass
class FittedPrompt:
    prompt: PreparedPrompt
    max_new_tokens: int
    dropped_turns: int  # user turns (with their answers) left out to fit the context
    replaced_image: bool  # an earlier image is no longer visible to the model


def keep_latest_image(messages: list[Message]) -> tuple[list[Message], bool]:
    """Remove all images but the newest. Returns the new list and whether any image was removed."""
    latest = max((i for i, m in enumerate(messages) if m.image is not None), default=None)
    out, removed = [], False
    for i, m in enumerate(messages):
        if m.image is not None and i != latest:
            m, removed = replace(m, image=None), True
        out.append(m)
    return out, removed


def _drop_oldest_turn(messages: list[Message]) -> list[Message]:
    """Drop the first user message and everything up to the next user message; keep the image."""
    next_user = next((i for i in range(1, len(messages)) if messages[i].role == "user"), None)
    if next_user is None:
        return messages
    dropped, kept = messages[:next_user], list(messages[next_user:])
    image = next((m.image for m in dropped if m.image is not None), None)
    if image is not None and not any(m.image is not None for m in kept):
        kept[0] = replace(kept[0], image=image)
    return kept


def fit_conversation(
    model: VisionChatModel,
    messages: list[Message],
    system_prompt: str | None,
    max_new_tokens: int,
    context_length: int | None = None,
) -> FittedPrompt:
    """Tokenize `messages` (ending with a user message) so that prompt plus answer fit the context."""
    context_length = context_length or model.context_length
    messages, replaced = keep_latest_image(messages)
    wanted_room = min(max_new_tokens, MIN_ANSWER_TOKENS)
    dropped = 0
    while True:
        prompt = model.tokenize(messages, system_prompt)
        room = context_length - len(prompt)
        user_turns = sum(m.role == "user" for m in messages)
        if room >= wanted_room or user_turns <= 1:
            break
        messages = _drop_oldest_turn(messages)
        dropped += 1
    if room < 1:
        image_note = f", including {model.image_token_count} for the image" if prompt.images else ""
        raise ContextTooLong(
            f"Your message is too long: the prompt needs {len(prompt):,} tokens{image_note}, but the model "
            f"reads at most {context_length:,}. Please shorten it."
        )
    return FittedPrompt(prompt, min(max_new_tokens, room), dropped, replaced)
