"""Records to token ids and loss masks: plain text is learned whole, conversations learn assistant turns.

Called by the tokenizing workers of `forge_qat.data.build`, a batch of records at a time. A record is a
`text` string, or a conversation: a list of {role, content} messages (or ShareGPT {from, value} pairs) in
a `messages` / `conversations` column, or the column `ChatOptions.column` names.

A conversation is rendered with the tokenizer's chat template and cut at the assistant spans, and every
piece is tokenized on its own: no token straddles the prompt/answer boundary even where the tokenizer
would merge across it, and the learned tokens are the ones the model emits after the generation prompt
at inference. The spans come from the template's `{% generation %}` marks where it has them, otherwise
from rendering each prompt with the generation prompt and checking it is a prefix of the conversation.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from forge_qat.errors import InputError

IGNORE_INDEX = -100
CHAT_COLUMNS = ("messages", "conversations")
CHAT_LOSSES = ("last", "all")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}
_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")

Locate = Callable[[], str]
"""Returns where the record being encoded is (`file:line`), called only to word an error."""


@dataclass(frozen=True, slots=True)
class ChatOptions:
    column: str | None = None
    """The conversation column; None: 'messages' or 'conversations', whichever a record has."""
    loss: str = "last"
    """Which assistant turns are learned: 'last' (the final message, which must be the assistant's) or 'all'."""

    def __post_init__(self) -> None:
        if self.loss not in CHAT_LOSSES:
            from forge_qat.errors import ConfigError, choices_message

            raise ConfigError(choices_message("chat loss", self.loss, list(CHAT_LOSSES)))


class Encoder:
    """Turns records into (token ids, loss mask) pairs with one tokenizer call per batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat: ChatOptions) -> None:
        self.tok = tokenizer
        self.chat = chat
        self.template = tokenizer.get_chat_template() if tokenizer.chat_template else None
        self.marks_generation = bool(self.template and _GENERATION_MARK.search(self.template))

    def encode(self, records: list[tuple[Locate, object]]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and loss masks (1: learned) of each record, in order."""
        plans, texts = [], []
        for locate, record in records:
            pieces, add_eos = self._pieces(record, locate)
            plans.append(([learned for _, learned in pieces], add_eos))
            texts.extend(text for text, _ in pieces)
        encoded = iter(self.tok(texts, add_special_tokens=False)["input_ids"] if texts else [])
        all_ids, all_masks = [], []
        for learned_flags, add_eos in plans:
            ids, mask = [], []
            for learned in learned_flags:
                piece = next(encoded)
                ids.extend(piece)
                mask.extend([int(learned)] * len(piece))
            if add_eos and self.tok.eos_token_id is not None:
                ids.append(self.tok.eos_token_id)
                mask.append(1)
            all_ids.append(ids)
            all_masks.append(mask)
        return all_ids, all_masks

    def _pieces(self, record: object, locate: Locate) -> tuple[list[tuple[str, bool]], bool]:
        """The record's text cut into (text, learned) pieces, and whether an end-of-sequence token follows."""
        if not isinstance(record, dict):
            raise InputError(f"{locate()}: each record must be an object, got {type(record).__name__}")
        column = self.chat.column or next((c for c in CHAT_COLUMNS if record.get(c) is not None), None)
        if self.chat.column and record.get(column) is None:
            raise InputError(f"{locate()}: no {column!r} field (--chat-column); the record has {sorted(record)}")
        if column:
            return self._chat_pieces(record[column], column, locate), False
        if isinstance(record.get("text"), str):
            return [(record["text"], True)], True
        raise InputError(f"{locate()}: each record needs a string 'text' field or a conversation list in "
                         f"{' or '.join(repr(c) for c in CHAT_COLUMNS)} (or --chat-column NAME); "
                         f"this one has {sorted(record)}")

    def _chat_pieces(self, value: object, column: str, locate: Locate) -> list[tuple[str, bool]]:
        messages = _messages(value, column, locate)
        if not self.template:
            raise InputError(f"{locate()}: chat data needs a tokenizer with a chat template; this one has none")
        if self.chat.loss == "last" and messages[-1]["role"] != "assistant":
            raise InputError(f"{locate()}: the last message must be the assistant turn to learn, got role "
                             f"{messages[-1]['role']!r} (--chat-loss all learns every assistant turn instead)")
        if not any(m["role"] == "assistant" for m in messages):
            raise InputError(f"{locate()}: the conversation has no assistant turn to learn")
        try:
            text, spans = (self._marked_spans if self.marks_generation else self._prefix_spans)(messages, locate)
        except InputError:
            raise
        except Exception as e:  # jinja2's TemplateError and what templates raise through raise_exception()
            raise InputError(f"{locate()}: the chat template refused this conversation: "
                             f"{str(e).splitlines()[0][:200]}") from None
        if self.chat.loss == "last":
            spans = spans[-1:]
        pieces, at = [], 0
        for start, stop in spans:
            pieces += [(text[at:start], False), (text[start:stop], True)]
            at = stop
        pieces.append((text[at:], False))
        return [p for p in pieces if p[0]]

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _prefix_spans(self, messages: list[dict], locate: Locate) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for i in turns[-1:] if self.chat.loss == "last" else turns:
            prompt = self._render(messages[:i], generation_prompt=True)
            upto = text if i == len(messages) - 1 else self._render(messages[:i + 1])
            if not (upto.startswith(prompt) and text.startswith(upto)):
                hint = " (it renders earlier turns differently once later turns follow); use --chat-loss last" \
                    if i < len(messages) - 1 else ""
                raise InputError(f"{locate()}: the chat template does not render the prompt as a prefix of the "
                                 f"conversation{hint}")
            spans.append((len(prompt), len(upto)))
        return text, spans

    def _marked_spans(self, messages: list[dict], locate: Locate) -> tuple[str, list[tuple[int, int]]]:
        # apply_chat_template returns the generation spans only as a token mask over its own tokenization
        # (a token straddling a span edge is counted in); the renderer behind it gives the character spans.
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, spans = render_jinja_template(conversations=[messages], chat_template=self.template,
                                                return_assistant_tokens_mask=True, **self.tok.special_tokens_map)
        if not spans[0]:
            raise InputError(f"{locate()}: the chat template marks no assistant text ({{% generation %}}) "
                             f"in this conversation")
        return rendered[0], [tuple(s) for s in spans[0]]


def _messages(value: object, column: str, locate: Locate) -> list[dict]:
    """The conversation as {role, content, ...} dicts; ShareGPT {from, value} pairs are renamed."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{locate()}: {column!r} must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(f"{locate()}: message {i} of {column!r} is not an object")
        m = {k: v for k, v in m.items() if v is not None}  # Arrow rows carry None for another row's keys
        if "from" in m and "role" not in m:
            if m["from"] not in SHAREGPT_ROLES:
                raise InputError(f"{locate()}: message {i} has 'from' {m['from']!r}; ShareGPT roles forge knows: "
                                 f"{', '.join(SHAREGPT_ROLES)}")
            m = {"role": SHAREGPT_ROLES[m.pop("from")], "content": m.pop("value", None), **m}
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{locate()}: message {i} of {column!r} needs a string 'role' and 'content' "
                             f"(or ShareGPT 'from' and 'value')")
        messages.append(m)
    return messages
