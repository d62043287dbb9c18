"""Every string the interface shows, in English and Chinese.

Component labels go through gr.I18n, so the page follows the browser's language; the language switch
in the page re-labels the same components with the other table. Messages produced while answering
(queue position, notices, errors) use the session's language, chosen the same way.
"""

from __future__ import annotations

STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "title": "## vlui · talk to a vision-language model about images",
        "subtitle": "Model: **{model}** · one image per conversation: when you send a new image, the model looks at that one from then on.",
        "input_placeholder": "Ask about an image: attach, paste or drop it here, type your question, press Enter.",
        "input_label": "Message",
        "chat_label": "Conversation",
        "stop": "Stop",
        "regenerate": "Regenerate",
        "undo": "Undo last turn",
        "clear": "Clear",
        "settings": "Generation settings",
        "system_prompt": "System prompt",
        "max_new_tokens": "Max new tokens",
        "temperature": "Temperature (0 = greedy)",
        "top_p": "Top-p",
        "repetition_penalty": "Repetition penalty",
        "language": "Interface language",
        "queued": "Waiting for a free slot: you are number {position} in line.",
        "stats": "{tokens} tokens · {rate} tokens/s · first token after {first:.2f} s",
        "stopped": "(stopped)",
        "dropped": "The conversation outgrew the model's {context:,}-token window: the {n} oldest turn(s) were left out of what it reads.",
        "new_image": "The model looks at one image per conversation: it now sees your new image, and no longer the earlier one.",
        "empty": "Type a question or attach an image first.",
        "nothing_to_redo": "There is no answer to regenerate yet.",
        "nothing_to_undo": "There is nothing to undo.",
        "error": "Sorry, the answer could not be generated: {message}",
    },
    "zh": {
        "title": "## vlui · 与视觉语言模型聊图片",
        "subtitle": "模型：**{model}** · 每段对话只看一张图片：发送新图片后，模型此后只看新图片。",
        "input_placeholder": "针对图片提问：在此上传、粘贴或拖入图片，输入问题，按回车发送。",
        "input_label": "消息",
        "chat_label": "对话",
        "stop": "停止",
        "regenerate": "重新生成",
        "undo": "撤销上一轮",
        "clear": "清空",
        "settings": "生成设置",
        "system_prompt": "系统提示词",
        "max_new_tokens": "最大生成长度（token）",
        "temperature": "温度（0 = 贪心解码）",
        "top_p": "Top-p",
        "repetition_penalty": "重复惩罚",
        "language": "界面语言",
        "queued": "正在排队等待空闲位置：您排在第 {position} 位。",
        "stats": "{tokens} 个 token · 每秒 {rate} 个 · 首个 token 用时 {first:.2f} 秒",
        "stopped": "（已停止）",
        "dropped": "对话超出了模型 {context:,} 个 token 的上下文窗口：最早的 {n} 轮未被模型读取。",
        "new_image": "每段对话模型只看一张图片：现在它看的是您的新图片，不再看之前的图片。",
        "empty": "请先输入问题或添加图片。",
        "nothing_to_redo": "还没有可以重新生成的回答。",
        "nothing_to_undo": "没有可以撤销的内容。",
        "error": "抱歉，无法生成回答：{message}",
    },
}

LANGUAGES = {"English": "en", "中文": "zh"}


def language_of(accept_language: str | None) -> str:
    """'zh' when the browser prefers Chinese, else 'en' (Accept-Language header, first entry wins)."""
    first = (accept_language or "").split(",")[0].strip().lower()
    return "zh" if first.startswith("zh") else "en"


def t(lang: str, key: str, **values) -> str:
    text = STRINGS.get(lang, STRINGS["en"])[key]
    return text.format(**values) if values else text
