"""The Gradio Blocks interface. Thin: it keeps each browser session's conversation and talks to the
engine; all model work happens in vlui.engine.

Per session (gr.State): the turns (text plus the decoded image), a conversation id (lets the engine
reuse the KV cache of earlier turns) and the interface language.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from vlui.conversation import ContextTooLong, fit_conversation
from vlui.engine.engine import Engine, EngineBusy, EngineError
from vlui.engine.sampling import SamplingParams
from vlui.images import ImageError, ImageLimits, LoadedImage, load_image
from vlui.models.base import Message
from vlui.ui.strings import LANGUAGES, STRINGS, language_of, t

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]  # no single "$": "$5 and $10" is money, not math
EXAMPLES = [
    ("What shapes and colours do you see? Describe where each one is.", "shapes.png"),
    ("What is written on this note, and what is it about?", "note.png"),
    ("这张图片里写了什么字？请逐行读出来。", "note.png"),
    ("用中文描述这张图片，并说出每种颜色的形状。", "shapes.png"),
]


@dataclass
class Turn:
    role: str
    text: str
    image: LoadedImage | None = None
    image_path: str | None = None
    answered: bool = False  # a user turn some answer stream has taken (or is taking) on


# Claiming a user turn for an answer must be atomic: events of one session run on several threads.
_CLAIM = threading.Lock()


class UserInputError(ValueError):
    """A message the app cannot use; `str(err)` is a sentence for the user."""


@dataclass
class Session:
    turns: list[Turn] = field(default_factory=list)
    conversation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    lang: str = "en"
    streaming: bool = False
    generation: int = 0  # bumped by every new message, Undo and Clear: an older answer stream stops


@dataclass
class Defaults:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0


def assistant_message(text: str) -> dict:
    # Text goes in a {"type": "text"} part: Gradio re-indents plain strings, which would break code blocks.
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_history(session: Session) -> list[dict]:
    """The Chatbot's messages for the session's turns."""
    history = []
    for turn in session.turns:
        content = []
        if turn.image_path:
            content.append({"path": turn.image_path, "alt_text": turn.image.name if turn.image else "image"})
        if turn.text or not content:
            content.append({"type": "text", "text": turn.text})
        history.append({"role": turn.role, "content": content})
    return history


def build_demo(engine: Engine, defaults: Defaults | None = None, limits: ImageLimits = ImageLimits()) -> gr.Blocks:
    model = engine.model
    defaults = defaults or Defaults()
    i18n = gr.I18n(**STRINGS)
    max_tokens_cap = max(16, min(4096, engine.runner.max_seq_len - 1))

    # Shown to every visitor: a local checkpoint's folder name, not the server's file system path.
    shown_name = os.path.basename(os.path.normpath(model.name)) if os.path.isdir(model.name) else model.name
    # Uploads are deleted after three hours, so anonymous users cannot fill the disk over time.
    with gr.Blocks(title="vlui", analytics_enabled=False, delete_cache=(3 * 3600, 3 * 3600)) as demo:
        session = gr.State(lambda: Session())  # a fresh conversation per browser session
        with gr.Row():
            with gr.Column(scale=5):
                title = gr.Markdown(i18n("title"))
                subtitle = gr.Markdown(STRINGS["en"]["subtitle"].format(model=shown_name))
            language = gr.Radio(list(LANGUAGES), value="English", label=i18n("language"), scale=1, min_width=160)
        chatbot = gr.Chatbot(
            label=i18n("chat_label"), height=560, latex_delimiters=LATEX, buttons=["copy", "copy_all"],
            render_markdown=True, elem_id="chat",
        )
        textbox = gr.MultimodalTextbox(
            placeholder=i18n("input_placeholder"), label=i18n("input_label"), file_types=["image"],
            file_count="single", sources=["upload"], max_plain_text_length=100_000, autofocus=True, elem_id="input",
        )
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            stop = gr.Button(i18n("stop"), variant="stop", elem_id="stop")
            regenerate = gr.Button(i18n("regenerate"), elem_id="regenerate")
            undo = gr.Button(i18n("undo"), elem_id="undo")
            clear = gr.Button(i18n("clear"), elem_id="clear")
        with gr.Accordion(i18n("settings"), open=False) as settings:
            system_prompt = gr.Textbox(
                value=model.default_system_prompt or "", label=i18n("system_prompt"), lines=3,
                visible=model.supports_system_prompt,
            )
            max_new_tokens = gr.Slider(1, max_tokens_cap, value=min(defaults.max_new_tokens, max_tokens_cap), step=1,
                                       label=i18n("max_new_tokens"))
            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label=i18n("temperature"))
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label=i18n("top_p"))
            repetition_penalty = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05,
                                           label=i18n("repetition_penalty"))
        examples = [[{"text": q, "files": [str(ASSETS / f)]}] for q, f in EXAMPLES if (ASSETS / f).exists()]
        if examples:
            gr.Examples(examples=examples, inputs=[textbox], label="Examples / 示例")

        settings_inputs = [system_prompt, max_new_tokens, temperature, top_p, repetition_penalty]

        # -- handlers -------------------------------------------------------------------------
        def new_turn(message: dict, state: Session) -> Turn:
            """The user's message as a turn; UserInputError (a sentence for the user) if it is unusable."""
            text = (message or {}).get("text", "") or ""
            files = (message or {}).get("files") or []
            if not text.strip() and not files:
                raise UserInputError(t(state.lang, "empty"))
            image = path = None
            if files:
                path = files[-1] if isinstance(files[-1], str) else files[-1].get("path")
                try:
                    image = load_image(path, limits)
                except ImageError as err:
                    raise UserInputError(str(err)) from None
            return Turn("user", text, image, path)

        def add_message(message: dict, state: Session):
            """Append the user's message. On bad input: a warning, and the input box keeps its content."""
            try:
                turn = new_turn(message, state)
            except UserInputError as err:
                gr.Warning(str(err))
                return gr.skip(), gr.skip(), state
            state.turns.append(turn)
            state.generation += 1
            return None, chat_history(state), state

        def refuse(state: Session, err: Exception, api: bool):
            """The request cannot run: nothing is lost, the question goes back into the input box."""
            turn = state.turns.pop()
            if api:
                raise gr.Error(str(err), print_exception=False)
            gr.Warning(str(err))
            restored = {"text": turn.text, "files": [turn.image_path] if turn.image_path else []}
            return chat_history(state), state, restored, ""

        def respond(state: Session, system, max_new, temp, top, penalty, api: bool = False):
            # Answer the last user turn, unless another stream has it or the user has since cleared or
            # undone it (an answer event can start late, after the Clear that should have cancelled it).
            with _CLAIM:
                pending = bool(state.turns) and state.turns[-1].role == "user" and not state.turns[-1].answered
                if pending:
                    state.turns[-1].answered = True
            if not pending:
                yield chat_history(state), state, gr.skip(), gr.skip()
                return
            lang, generation = state.lang, state.generation
            messages = [Message(turn.role, turn.text, turn.image) for turn in state.turns]
            try:
                params = SamplingParams(int(max_new), float(temp), float(top), float(penalty)).validate()
                fitted = fit_conversation(model, messages, system if model.supports_system_prompt else None,
                                          params.max_new_tokens, engine.runner.max_seq_len)
                params = SamplingParams(fitted.max_new_tokens, params.temperature, params.top_p,
                                        params.repetition_penalty)
                handle = engine.submit(fitted.prompt, params, state.conversation_id)
            except (ContextTooLong, EngineBusy, EngineError, ValueError) as err:
                yield refuse(state, err, api)
                return
            if fitted.replaced_image:
                gr.Info(t(lang, "new_image"))
            if fitted.dropped_turns:
                gr.Info(t(lang, "dropped", context=engine.runner.max_seq_len, n=fitted.dropped_turns))
            answer = Turn("assistant", "")
            state.turns.append(answer)
            state.streaming = True
            try:
                yield chat_history(state), state, gr.skip(), ""
                for event in handle:
                    if state.generation != generation:
                        return  # the user moved on (new message, Undo, Clear): this answer stays as it is
                    if event.kind == "queued":
                        waiting = chat_history(state)[:-1] + [assistant_message(t(lang, "queued", position=event.position))]
                        yield waiting, state, gr.skip(), ""
                    elif event.kind == "text":
                        answer.text += event.text
                        yield chat_history(state), state, gr.skip(), gr.skip()
                    elif event.kind == "done":
                        stats = event.stats or {}
                        line = t(lang, "stats", tokens=stats.get("new_tokens", 0), rate=stats.get("tokens_per_s") or "–",
                                 first=stats.get("first_token_s") or 0.0)
                        if event.finish_reason == "cancelled":
                            line += " " + t(lang, "stopped")
                        yield chat_history(state), state, gr.skip(), line
                    elif event.kind == "error":
                        answer.text = answer.text + ("\n\n" if answer.text else "") + t(lang, "error", message=event.text)
                        yield chat_history(state), state, gr.skip(), ""
            finally:
                state.streaming = False
                handle.cancel()  # Stop, Regenerate, a closed tab: free the GPU slot within one step

        def drop_answer(state: Session):
            if not state.turns:
                gr.Warning(t(state.lang, "nothing_to_redo"))
                return gr.skip(), state
            if state.turns[-1].role == "assistant":
                state.turns.pop()
            state.turns[-1].answered = False  # ask the last question again
            state.generation += 1
            return chat_history(state), state

        def undo_turn(state: Session):
            if not state.turns:
                gr.Warning(t(state.lang, "nothing_to_undo"))
                return gr.skip(), state, gr.skip(), gr.skip()
            if state.turns[-1].role == "assistant":
                state.turns.pop()
            user = state.turns.pop() if state.turns and state.turns[-1].role == "user" else None
            state.generation += 1
            restored = {"text": user.text, "files": [user.image_path] if user.image_path else []} if user else None
            return chat_history(state), state, restored, ""

        def clear_all(state: Session):
            # In place, so a stream still running (or about to start) for it sees an empty conversation.
            state.turns.clear()
            state.conversation_id = uuid.uuid4().hex
            state.generation += 1
            return [], state, None, ""

        def stopped(state: Session):
            return t(state.lang, "stopped") if state.streaming else gr.skip()

        def relabel(choice: str, state: Session):
            lang = LANGUAGES.get(choice, "en")
            state.lang = lang
            s = STRINGS[lang]
            return (
                state,
                gr.update(value=s["title"]),
                gr.update(value=s["subtitle"].format(model=shown_name)),
                gr.update(value=choice, label=s["language"]),
                gr.update(label=s["chat_label"]),
                gr.update(label=s["input_label"], placeholder=s["input_placeholder"]),
                gr.update(value=s["stop"]), gr.update(value=s["regenerate"]), gr.update(value=s["undo"]),
                gr.update(value=s["clear"]), gr.update(label=s["settings"]), gr.update(label=s["system_prompt"]),
                gr.update(label=s["max_new_tokens"]), gr.update(label=s["temperature"]), gr.update(label=s["top_p"]),
                gr.update(label=s["repetition_penalty"]),
            )

        def on_load(state: Session, request: gr.Request):
            state.lang = language_of(request.headers.get("accept-language") if request else None)
            choice = next(k for k, v in LANGUAGES.items() if v == state.lang)
            return relabel(choice, state)

        labelled = [title, subtitle, language, chatbot, textbox, stop, regenerate, undo, clear, settings,
                    system_prompt, max_new_tokens, temperature, top_p, repetition_penalty]
        demo.load(on_load, [session], [session, *labelled], queue=False, api_visibility="private")
        language.input(relabel, [language, session], [session, *labelled], queue=False, api_visibility="private")

        # -- wiring ---------------------------------------------------------------------------
        answer_outputs = [chatbot, session, textbox, status]
        running: list = []
        submitted = textbox.submit(add_message, [textbox, session], [textbox, chatbot, session],
                                   api_visibility="private", show_progress="hidden")
        running.append(submitted)  # Clear or Undo right after Enter must also cancel the message not yet added
        running.append(submitted.success(respond, [session, *settings_inputs], answer_outputs,
                                         api_visibility="private", concurrency_limit=None))
        regenerated = regenerate.click(drop_answer, [session], [chatbot, session], api_visibility="private",
                                       show_progress="hidden")
        running.append(regenerated)
        running.append(regenerated.success(respond, [session, *settings_inputs], answer_outputs,
                                           api_visibility="private", concurrency_limit=None))
        stop.click(stopped, [session], [status], cancels=running, queue=False, api_visibility="private")
        # Each is followed by a redraw from the session, in case a cancelled stream's last update
        # reached the page after it.
        redraw = dict(fn=chat_history, inputs=[session], outputs=[chatbot], api_visibility="private",
                      show_progress="hidden")
        undo.click(undo_turn, [session], [chatbot, session, textbox, status], cancels=running,
                   api_visibility="private", show_progress="hidden").then(**redraw)
        clear.click(clear_all, [session], [chatbot, session, textbox, status], queue=False, cancels=running,
                    api_name="clear").then(**redraw)

        # API endpoint: gradio_client sends {"text", "files"} and the settings, and streams the answer.
        # Each client session is one conversation (call /clear, or use a new Client, to start over).
        def chat_api(message: dict, state: Session, *settings):
            try:
                state.turns.append(new_turn(message, state))
            except UserInputError as err:
                raise gr.Error(str(err), print_exception=False) from None
            state.generation += 1
            yield from respond(state, *settings, api=True)

        api_box = gr.MultimodalTextbox(visible=False)
        gr.Button(visible=False).click(chat_api, [api_box, session, *settings_inputs], answer_outputs,
                                       api_name="chat", concurrency_limit=None)
    demo.queue(max_size=engine.config.max_queue * 4, default_concurrency_limit=None)
    return demo
