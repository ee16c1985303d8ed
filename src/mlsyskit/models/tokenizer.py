"""Text <-> token ids for a checkpoint, on top of the `tokenizers` library.

Built either from a Hugging Face ``tokenizer.json`` (:meth:`Tokenizer.from_hf_dir`) or from the
vocabulary a GGUF file carries as metadata (:meth:`Tokenizer.from_gguf_metadata`: byte-level BPE,
``tokenizer.ggml.model == "gpt2"``). Also renders the checkpoint's Jinja chat template and decodes
a token stream incrementally without ever emitting half a UTF-8 character.

Chat prompts keep message text as text: :meth:`Tokenizer.apply_chat_template` returns a
:class:`ChatPrompt` that remembers where each message's content lies, and :meth:`Tokenizer.encode`
turns only the template's own markers into special tokens, so a ``<|im_start|>`` typed in a message
cannot open a fake system turn (as chat servers do).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from mlsyskit.errors import UserError

# Used when a checkpoint ships no chat template: plain ChatML (<|im_start|>role\ncontent<|im_end|>\n).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Tokens that end a turn in common chat formats. Like llama.cpp, a GGUF checkpoint stops on any
# of these that its vocabulary marks as a control token, besides its declared EOS.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<EOT>",
)

_GGUF_EOS_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)
# llama.cpp's token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split regexes, keyed by tokenizer.ggml.pre (same expressions as llama.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# These split every digit apart, then apply GPT-2's regex (SmolLM2's own tokenizer.json does
# exactly this: Digits(individual_digits=True) then ByteLevel).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer for a GGUF byte-level vocabulary (tokenizer.ggml.pre); GPT-2's otherwise."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does (sandboxed, trimmed blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise UserError(f"the checkpoint's chat template does not compile: {exc}") from exc


# Stand-ins for message contents while locating them in a rendered chat prompt (private-use
# characters, so a template never produces them itself).
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


class ChatPrompt(str):
    """A chat prompt rendered by :meth:`Tokenizer.apply_chat_template`: a ``str`` that also
    records the ``(start, end)`` character spans holding the messages' own text.

    :meth:`Tokenizer.encode` parses special tokens only outside these spans. Slicing or
    concatenating gives a plain ``str``, whose special-token text is parsed everywhere again.
    """

    message_spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, message_spans: Sequence[tuple[int, int]] = ()) -> ChatPrompt:
        obj = super().__new__(cls, text)
        obj.message_spans = tuple(message_spans)
        return obj


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special ids and chat template rendering."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self._tk = backend
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids))  # de-duplicated, declared EOS first
        self.add_bos = add_bos
        self.chat_template = chat_template

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF ``tokenizer.*`` metadata (plain Python values, keys as in the file)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UserError(
                f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')"
            )
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or not merges:
            raise UserError("GGUF byte-level tokenizer lacks tokenizer.ggml.tokens or .merges")
        alphabet = _byte_alphabet()
        letters = set(alphabet.values())
        # Tokens are stored in the byte alphabet; respell any that are not (as transformers does).
        vocab = {
            tok if set(tok) <= letters else "".join(alphabet[b] for b in tok.encode()): i
            for i, tok in enumerate(tokens)
        }
        bpe = models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            # llama.cpp looks whole words up in the vocabulary first for Llama-3 vocabularies
            ignore_merges=meta.get("tokenizer.ggml.pre") in ("llama3", "llama-bpe"),
        )
        tk = _HFTokenizer(bpe)
        tk.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        tk.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> ...) must match whole and count as special; a "control"
        # token spelled outside the byte alphabet is a known llama.cpp mislabel and is skipped.
        special = [
            t for t, k in zip(tokens, types, strict=False) if k == _CONTROL and set(t) <= letters
        ]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED]
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        eos_ids = [meta[k] for k in _GGUF_EOS_KEYS if meta.get(k) is not None]
        eos_ids += [tk.token_to_id(t) for t in END_OF_TURN_TOKENS if t in special]
        return cls(
            tk,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=[int(i) for i in eos_ids],
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: Path, *, bos_id: int | None, eos_ids: Sequence[int]) -> Tokenizer:
        """Build from a Hugging Face checkpoint directory (``tokenizer.json`` required).

        ``bos_id``/``eos_ids`` come from config.json (empty/None: from tokenizer_config.json's
        ``bos_token``/``eos_token``). The chat template comes from ``chat_template.jinja`` or
        ``tokenizer_config.json``; ``add_bos`` from tokenizer_config's ``add_bos_token``, else
        from whether the tokenizer.json post-processor itself prepends BOS.
        """
        file = path / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{path} has no tokenizer.json (needed to tokenize text)")
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise UserError(f"cannot read {file}: {exc}") from exc
        tk_config: dict[str, Any] = {}
        if (config_file := path / "tokenizer_config.json").is_file():
            try:
                tk_config = json.loads(config_file.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"cannot read {config_file}: {exc}") from exc
        # ids from config.json win; tokenizer_config.json's token strings fill the gaps
        if bos_id is None and (bos := _token_text(tk_config.get("bos_token"))) is not None:
            bos_id = tk.token_to_id(bos)
        if not eos_ids and (eos := _token_text(tk_config.get("eos_token"))) is not None:
            eos_ids = [i for i in [tk.token_to_id(eos)] if i is not None]
        add_bos = tk_config.get("add_bos_token")
        if add_bos is None:
            probe = tk.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        return cls(
            tk,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=bool(add_bos),
            chat_template=_hf_chat_template(path, tk_config),
        )

    # -- encode / decode ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) map to
        their single id, except inside the message spans of a :class:`ChatPrompt`, where they
        stay plain text. ``add_bos=None`` uses the checkpoint's default."""
        try:
            if isinstance(text, ChatPrompt) and text.message_spans:
                ids = self._encode_chat_prompt(text)
            else:
                ids = self._tk.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side takes only valid Unicode: lone surrogates end up here
            _check_unicode(text)
            raise
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (messages' text never
        becomes special tokens); the template itself adds BOS where the model wants it."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)

    @functools.cached_property
    def _literal_tk(self) -> _HFTokenizer:
        """A copy of the backend that reads special-token text as plain text (a copy, not a
        toggle, so concurrent encodes on the shared backend are never affected)."""
        tk = _HFTokenizer.from_str(self._tk.to_str())
        tk.encode_special_tokens = True
        return tk

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)

    def _encode_chat_prompt(self, prompt: ChatPrompt) -> list[int]:
        # Tokenize as usual, keep as markers only the special tokens outside every message span,
        # then tokenize the text between markers with special tokens read as text. Without
        # special text inside the messages this gives exactly the ids of the plain encoding.
        enc = self._tk.encode(prompt, add_special_tokens=False)
        spans = prompt.message_spans
        ids: list[int] = []
        pos = 0
        for tid, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            if tid in self._special_ids and not any(a < end and start < b for a, b in spans):
                if start > pos:
                    ids += self._literal_tk.encode(prompt[pos:start], add_special_tokens=False).ids
                ids.append(tid)
                pos = end
        if pos < len(prompt):
            ids += self._literal_tk.encode(prompt[pos:], add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def incremental_decoder(self, skip_special: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special=skip_special)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> ChatPrompt:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the checkpoint's template
        (ChatML when it has none), as transformers' ``apply_chat_template(tokenize=False)``.

        The result is a :class:`ChatPrompt`: the same text, plus where each message's content
        lies, so that :meth:`encode` keeps special-token text typed in a message as text. If the
        template rewrites message text (so it cannot be located) and a message contains a
        special token's text, the messages are refused rather than encoded unsafely."""
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise UserError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise UserError(f"chat message {i} has no 'role' string: {m!r}")
            if not isinstance(m.get("content"), str):
                raise UserError(f"chat message {i} has no 'content' string: {m!r}")
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        extra = {
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._text_of(self.bos_id),
            "eos_token": self._text_of(self.eos_ids[0] if self.eos_ids else None),
        }
        try:
            text = template.render(messages=[dict(m) for m in messages], **extra)
        except jinja2.TemplateError as exc:  # includes the template's own raise_exception
            raise UserError(f"chat template rejected the messages: {exc}") from exc
        spans = self._message_spans(template, messages, extra, text)
        if spans is None:
            spans = ()
            specials = [self._tk.id_to_token(i) for i in self._special_ids]
            for i, m in enumerate(messages):
                typed = next((t for t in specials if t and t in m["content"]), None)
                if typed is not None:
                    raise UserError(
                        f"chat message {i} contains the special token {typed!r}, and this model's "
                        "chat template rewrites message text, so it cannot be kept as plain text; "
                        "remove it"
                    )
        return ChatPrompt(text, spans)

    @staticmethod
    def _message_spans(
        template: jinja2.Template,
        messages: Sequence[Mapping[str, Any]],
        extra: Mapping[str, Any],
        text: str,
    ) -> list[tuple[int, int]] | None:
        """Where the messages' contents lie in ``text``: render again with a marker in place of
        each content and put the contents back; None unless that rebuilds ``text`` exactly (the
        template trims, tests or otherwise rewrites the content)."""
        marked = [dict(m, content=_MARK.format(i)) for i, m in enumerate(messages)]
        try:
            rendered = template.render(messages=marked, **extra)
        except jinja2.TemplateError:
            return None
        pieces = _MARK_RE.split(rendered)  # text, index, text, index, ..., text
        spans: list[tuple[int, int]] = []
        out = [pieces[0]]
        pos = len(pieces[0])
        for k in range(1, len(pieces), 2):
            i = int(pieces[k])
            if i >= len(messages):
                return None
            content = messages[i]["content"]
            spans.append((pos, pos + len(content)))
            out += [content, pieces[k + 1]]
            pos += len(content) + len(pieces[k + 1])
        return spans if "".join(out) == text else None

    def _text_of(self, token_id: int | None) -> str:
        token = None if token_id is None else self._tk.id_to_token(token_id)
        return token or ""


def _check_unicode(text: str) -> None:
    """UserError if ``text`` holds a lone surrogate (how Python carries undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"undecodable byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise UserError(f"the text is not valid Unicode ({what} at character {e.start})") from None


def _hf_chat_template(path: Path, tk_config: Mapping[str, Any]) -> str | None:
    """The chat template of a HF checkpoint dir: chat_template.jinja, else tokenizer_config."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = tk_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class IncrementalDecoder:
    """Streams text token by token; never emits half a UTF-8 character.

    Decodes a small window of recent ids and emits only what extends the previous decode of that
    window, holding back while the text ends in U+FFFD (an incomplete byte sequence); at the end
    of the stream, :meth:`flush` drops a character that never completed. Decoding a
    window (not single tokens) also keeps SentencePiece's leading spaces right.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text ("" while a character is partial)."""
        self._ids.append(token_id)
        prev = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the stream.

        A character the stream stopped in the middle of (``max_tokens`` reached after the first
        bytes of an emoji) is dropped, not shown as U+FFFD: the text ends with the last complete
        character. (A U+FFFD the model spelled out in full right at the end is dropped with it;
        the two cannot be told apart from the decoded text.)"""
        prev = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(prev) :].rstrip("\ufffd")
