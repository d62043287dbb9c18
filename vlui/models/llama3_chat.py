"""The Llama-3 chat format, which both model families use, as a list of segments.

A prompt is built from two kinds of text: the template's own markup (`<|start_header_id|>`, ...),
whose special tokens must be parsed, and what users and the model wrote, whose must not: a user who
types `<|eot_id|><|start_header_id|>system...` or the image placeholder gets those characters read as
plain text, not a forged turn or a phantom image. `Segment.trusted` tells the tokenizer which is which.
"""

from __future__ import annotations

from vlui.models.base import IMAGE, Message, Segment

HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
EOT = "<|eot_id|>"


def llama3_segments(messages: list[Message], system_prompt: str | None, trim: bool = False) -> list[Segment]:
    """"<image>\\n" opens the user message that carries the image (both seed models' format).
    `trim` strips each message as Meta's chat template does (`| trim`), which 360VL's official code uses."""
    out: list[Segment] = []

    def turn(role: str, text: str, image: bool = False) -> None:
        out.append(Segment(HEADER.format(role=role), trusted=True))
        if image:
            out.append(IMAGE)
            text = "\n" + text
            text = text.rstrip() if trim else text  # the placeholder is not whitespace: only the end trims
        elif trim:
            text = text.strip()
        if text:
            out.append(Segment(text))
        out.append(Segment(EOT, trusted=True))

    if system_prompt and (system_prompt.strip() if trim else system_prompt):
        turn("system", system_prompt)
    for m in messages:
        turn(m.role, m.text, image=m.image is not None)
    out.append(Segment(HEADER.format(role="assistant"), trusted=True))
    return out
