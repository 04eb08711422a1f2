"""Byte-level BPE tokenizer for LLaMA-family models, built from GGUF metadata or a tokenizer.json.

The heavy lifting is done by the Rust `tokenizers` library; this module only assembles the right
pipeline (vocabulary, merges, pre-tokenizer, special tokens) and adds the few conveniences the
rest of the project needs (BOS handling, ids of special tokens, the ChatML chat format).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# llama.cpp's `tokenizer.ggml.pre` names whose pre-tokenization is "isolate every \p{N} code
# point, then the GPT-2 regex" (llama-vocab.cpp groups them under one regex list). The Hugging
# Face equivalent is Digits(individual_digits=True) followed by ByteLevel(use_regex=True);
# SmolLM2's own tokenizer.json uses exactly that pair.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell"})
# Names whose pre-tokenization is the plain GPT-2 regex.
_GPT2 = frozenset({"gpt-2", "mpt", "olmo"})

# Values of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3  # special tokens such as <|im_start|>; skipped by decode
_TOKEN_TYPE_USER_DEFINED = 4  # added tokens matched verbatim but decoded as text

# A ChatML template writes each turn as '<|im_start|>' + role + '\n' + content + '<|im_end|>\n'.
_CHATML_TURN = "'<|im_start|>' + message['role']"
# SmolLM2-style templates inject a default system turn when the conversation has none. The turn
# is a Jinja string literal whose newlines may be written raw or as the escape "\n".
_DEFAULT_SYSTEM_RE = re.compile(
    r"messages\[0\]\['role'\]\s*!=\s*'system'\s*%\}\{\{\s*'<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>(?:\n|\\n)'",
    re.DOTALL,
)


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the ids of its special tokens and the model's chat format.

  Text is encoded without any post-processing: `encode` adds BOS only when asked. Special-token
  strings that appear in the text (e.g. "<|im_start|>") are encoded as their single special id,
  which is what a rendered chat prompt needs.
  """

  def __init__(
      self,
      tokenizer: tokenizers.Tokenizer,
      *,
      bos_id: int | None = None,
      eos_id: int | None = None,
      pad_id: int | None = None,
      chat_template: str | None = None,
  ):
    """Wraps a ready `tokenizers.Tokenizer`.

    Args:
      tokenizer: the Rust tokenizer; its post-processor is not used by `encode`.
      bos_id: id of the beginning-of-sequence token, or None if the model has none.
      eos_id: id of the end-of-sequence (end-of-turn) token, or None.
      pad_id: id used for padding, or None when the model defines none.
      chat_template: the model's Jinja chat template (only ChatML templates can be applied).
    """
    self._tokenizer = tokenizer
    self._bos_id = bos_id
    self._eos_id = eos_id
    self._pad_id = pad_id
    self.chat_template = chat_template

  @classmethod
  def from_gguf(cls, source: str | os.PathLike[str] | gguf.GGUFReader) -> "Tokenizer":
    """Rebuilds the byte-level BPE tokenizer stored in a GGUF file's metadata.

    Args:
      source: path of a .gguf file, or a `gguf.GGUFReader` already opened on one (parsing the
        metadata of a real file takes seconds, so callers that also load weights share one).

    Returns:
      The tokenizer, with BOS/EOS/pad ids and the chat template taken from the metadata.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file has no tokenizer metadata, or it is inconsistent.
      NotImplementedError: the tokenizer is not byte-level BPE ("gpt2"), or its pre-tokenizer
        (`tokenizer.ggml.pre`) is not one this module reproduces.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else _open_gguf(source)
    fields = reader.fields

    def field(key: str, default=None):
      return fields[key].contents() if key in fields else default

    tokens = field("tokenizer.ggml.tokens")
    if tokens is None:
      raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.tokens)")
    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise NotImplementedError(
          f"GGUF tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') tokenizers are supported"
      )
    pre = field("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
      pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ])
    elif pre in _GPT2:
      pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
      raise NotImplementedError(
          f"GGUF tokenizer.ggml.pre={pre!r} is not supported "
          f"(supported: {sorted(_DIGITS_THEN_GPT2 | _GPT2)})"
      )

    merges = []
    for merge in field("tokenizer.ggml.merges", []):
      pair = tuple(merge.split(" "))
      if len(pair) != 2:
        raise ValueError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
      merges.append(pair)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError("tokenizer.ggml.tokens contains duplicate tokens")

    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    token_types = field("tokenizer.ggml.token_type")
    if token_types is not None:
      if len(token_types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
      # Registering a token that is already in the vocabulary keeps its id; it only makes the
      # token match verbatim in input text, before pre-tokenization.
      tokenizer.add_special_tokens([
          tokenizers.AddedToken(tokens[i], special=True, normalized=False)
          for i, t in enumerate(token_types) if t == _TOKEN_TYPE_CONTROL
      ])
      tokenizer.add_tokens([
          tokenizers.AddedToken(tokens[i], special=False, normalized=False)
          for i, t in enumerate(token_types) if t == _TOKEN_TYPE_USER_DEFINED
      ])
    return cls(
        tokenizer,
        bos_id=field("tokenizer.ggml.bos_token_id"),
        eos_id=field("tokenizer.ggml.eos_token_id"),
        pad_id=field("tokenizer.ggml.padding_token_id"),
        chat_template=field("tokenizer.chat_template"),
    )

  @classmethod
  def from_file(
      cls,
      path: str | os.PathLike[str],
      *,
      bos_id: int | None = None,
      eos_id: int | None = None,
      pad_id: int | None = None,
      chat_template: str | None = None,
  ) -> "Tokenizer":
    """Loads a Hugging Face `tokenizer.json`.

    A tokenizer.json does not say which tokens are BOS/EOS/pad; pass the ids from the model's
    config.json (`models.loaders.load_model` does).

    Args:
      path: the tokenizer.json file.
      bos_id: id of the beginning-of-sequence token, or None.
      eos_id: id of the end-of-sequence token, or None.
      pad_id: id of the padding token, or None.
      chat_template: the model's chat template, e.g. from tokenizer_config.json.

    Raises:
      FileNotFoundError: the file does not exist.
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {os.fspath(path)}")
    return cls(
        tokenizers.Tokenizer.from_file(os.fspath(path)),
        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=chat_template,
    )

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def pad_id(self) -> int | None:
    return self._pad_id

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying Rust tokenizer."""
    return self._tokenizer

  def _prefix(self, add_bos: bool) -> list[int]:
    if not add_bos:
      return []
    if self._bos_id is None:
      raise ValueError("add_bos=True but this tokenizer has no BOS token")
    return [self._bos_id]

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`, optionally preceded by BOS."""
    return self._prefix(add_bos) + self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
    """Token ids of several texts, encoded in parallel by the Rust library."""
    prefix = self._prefix(add_bos)
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [prefix + e.ids for e in encodings]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of a sequence of token ids (any iterable of ints, e.g. a numpy or JAX array)."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Renders a conversation in the model's ChatML format, as its chat template would.

    Each turn becomes "<|im_start|>{role}\\n{content}<|im_end|>\\n". When the template supplies a
    default system prompt (SmolLM2's does) and the conversation does not start with a system
    turn, that system turn is prepended. Only ChatML templates are supported: rendering
    arbitrary Jinja would need jinja2, which this project does not depend on.

    Args:
      messages: turns as {"role": ..., "content": ...}, in order.
      add_generation_prompt: end with "<|im_start|>assistant\\n" so the model answers next.

    Returns:
      The prompt text; encode it with `encode` (its special-token strings map to their ids).

    Raises:
      ValueError: there is no chat template, or a message lacks "role" / "content".
      NotImplementedError: the chat template is not ChatML.
    """
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    if _CHATML_TURN not in self.chat_template:
      raise NotImplementedError("only ChatML chat templates ('<|im_start|>' + role) are supported")
    turns = []
    default_system = _DEFAULT_SYSTEM_RE.search(self.chat_template)
    # The template emits the default turn inside its message loop: an empty conversation gets none.
    if default_system is not None and messages and messages[0].get("role") != "system":
      turns.append(f"<|im_start|>system\n{default_system.group(1)}<|im_end|>\n")
    for message in messages:
      if "role" not in message or "content" not in message:
        raise ValueError(f"chat message needs 'role' and 'content', got keys {sorted(message)}")
      turns.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
      turns.append("<|im_start|>assistant\n")
    return "".join(turns)


def _open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {os.fspath(path)}")
  return gguf.GGUFReader(path)
