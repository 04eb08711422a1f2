"""Byte-level BPE tokenizer for LLaMA-family models, built from GGUF metadata or a tokenizer.json.

The heavy lifting is done by the Rust `tokenizers` library; this module only assembles the right
pipeline (vocabulary, merges, pre-tokenizer, special tokens) and adds the few conveniences the
rest of the project needs (BOS handling, ids of special tokens, the ChatML chat format).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
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
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    name = str(reader.data.filename)

    def field(key: str, kind: str = "str", default=None):
      return gguf_value(reader, key, kind, default)

    tokens = field("tokenizer.ggml.tokens", "list[str]")
    if tokens is None:
      raise ValueError(f"{name}: GGUF file has no tokenizer metadata (tokenizer.ggml.tokens)")
    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise NotImplementedError(
          f"{name}: GGUF tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') tokenizers are supported"
      )
    pre = field("tokenizer.ggml.pre", "str", "default")
    if pre in _DIGITS_THEN_GPT2:
      pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ])
    elif pre in _GPT2:
      pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
      raise NotImplementedError(
          f"{name}: GGUF tokenizer.ggml.pre={pre!r} is not supported "
          f"(supported: {sorted(_DIGITS_THEN_GPT2 | _GPT2)})"
      )

    merges = []
    for merge in field("tokenizer.ggml.merges", "list[str]", []):
      pair = tuple(merge.split(" "))
      if len(pair) != 2:
        raise ValueError(f"{name}: malformed BPE merge {merge!r} in tokenizer.ggml.merges")
      merges.append(pair)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError(f"{name}: tokenizer.ggml.tokens contains duplicate tokens")

    try:
      bpe = models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False)
    except Exception as e:  # the Rust library raises plain Exception, e.g. for a merge of unknown tokens
      raise ValueError(f"{name}: inconsistent BPE tokenizer metadata: {e}") from None
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    token_types = field("tokenizer.ggml.token_type", "list[int]")
    if token_types is not None:
      if len(token_types) != len(tokens):
        raise ValueError(
            f"{name}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
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
    ids = {}
    for key in ("bos", "eos", "padding"):
      ids[key] = field(f"tokenizer.ggml.{key}_token_id", "int")
      if ids[key] is not None and not 0 <= ids[key] < len(tokens):
        raise ValueError(
            f"{name}: tokenizer.ggml.{key}_token_id={ids[key]} is not an id of the {len(tokens)} tokens"
        )
    return cls(
        tokenizer, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"],
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
      ValueError: the file is not UTF-8 JSON, or not a tokenizer.json the library can build.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
      with open(path, "rb") as f:
        text = f.read().decode("utf-8")
      spec = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
      raise ValueError(f"{path}: not a valid tokenizer.json (not UTF-8 JSON): {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
      raise ValueError(f"{path}: not a tokenizer.json: expected a JSON object with a \"model\" object")
    try:
      rust = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust library raises plain Exception for any malformed content
      raise ValueError(f"{path}: malformed tokenizer.json: {e}") from None
    return cls(rust, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=chat_template)

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
  def id_bound(self) -> int:
    """One more than the largest token id (ids need not be contiguous); the model's embedding
    must have at least this many rows."""
    return max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

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


# ----------------------------------------------------------------------------------------------
# Opening GGUF files safely (shared with models.loaders).

# GGUF value type ids (gguf.GGUFValueType) of fixed-size scalars -> their size in bytes.
_GGUF_SCALAR_SIZES = {
    gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.UINT16: 2,
    gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4,
    gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.BOOL: 1, gguf.GGUFValueType.UINT64: 8,
    gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8,
}
# gguf.GGUFReader builds one numpy object per array element (~100 bytes each), so an array's
# length is bounded well beyond any real vocabulary (262k tokens) but far below what a file of
# a few hundred MB could claim.
_GGUF_MAX_ARRAY = 1 << 22
_GGUF_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
_GGUF_MAX_NESTING = 8


def _check_gguf_layout(buf, size: int, name: str):
  """Walks a GGUF file's header, checking every count and length against the bytes present.

  gguf.GGUFReader trusts the counts in the file: a truncated or hostile file makes it fail with
  an unrelated numpy error, or (an array count of 2**60 past the end of the file) loop without
  end, since reads past the end return empty arrays instead of failing.
  """
  pos = 0
  order = "<"

  def take(n: int, what: str) -> int:
    nonlocal pos
    if n > size - pos:
      raise ValueError(
          f"{name}: truncated or corrupt GGUF file: {what} at byte {pos} needs {n} bytes, "
          f"only {size - pos} remain"
      )
    pos += n
    return pos - n

  def u32(what: str) -> int:
    return struct.unpack_from(order + "I", buf, take(4, what))[0]

  def u64(what: str) -> int:
    return struct.unpack_from(order + "Q", buf, take(8, what))[0]

  def text(what: str) -> str:
    n = u64(f"length of {what}")
    start = take(n, what)
    try:
      return bytes(buf[start:start + n]).decode("utf-8")
    except UnicodeDecodeError:
      raise ValueError(f"{name}: corrupt GGUF file: {what} at byte {start} is not UTF-8") from None

  def value(vtype: int, what: str, depth: int = 0):
    if vtype in _GGUF_SCALAR_SIZES:
      return take(_GGUF_SCALAR_SIZES[vtype], what)
    if vtype == gguf.GGUFValueType.STRING:
      return take(u64(f"length of {what}"), what)
    if vtype != gguf.GGUFValueType.ARRAY or depth >= _GGUF_MAX_NESTING:
      raise ValueError(f"{name}: corrupt GGUF file: {what} has unknown value type {vtype}")
    item_type, count = u32(f"item type of {what}"), u64(f"length of {what}")
    if count > _GGUF_MAX_ARRAY:
      raise ValueError(f"{name}: GGUF metadata {what} claims {count} entries (at most {_GGUF_MAX_ARRAY} accepted)")
    if item_type in _GGUF_SCALAR_SIZES:
      return take(count * _GGUF_SCALAR_SIZES[item_type], what)
    # Each string or array item takes at least 8 bytes: check the claim before looping over it.
    if count * 8 > size - pos:
      take(count * 8, f"{count} entries of {what}")
    for _ in range(count):
      value(item_type, what, depth + 1)

  if size < 24:
    take(24, "header")
  if bytes(buf[:4]) != b"GGUF":
    raise ValueError(f"{name}: not a GGUF file (no GGUF magic)")
  pos = 4
  if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0:  # written on a big-endian machine
    order = ">"
  u32("version")
  tensor_count, kv_count = u64("tensor count"), u64("metadata count")
  # A metadata entry takes at least 8 + 4 + 1 bytes, a tensor description at least 8 + 4 + 4 + 8.
  if kv_count * 13 + tensor_count * 24 > size - pos:
    raise ValueError(
        f"{name}: truncated or corrupt GGUF file: it claims {kv_count} metadata entries and "
        f"{tensor_count} tensors, more than its {size} bytes can hold"
    )
  alignment = 32
  for _ in range(kv_count):
    key = text("metadata key")
    vtype = u32(f"type of {key!r}")
    start = value(vtype, repr(key))
    if key == "general.alignment" and vtype == gguf.GGUFValueType.UINT32:
      alignment = struct.unpack_from(order + "I", buf, start)[0]
  if alignment <= 0 or alignment & (alignment - 1):
    raise ValueError(f"{name}: corrupt GGUF file: general.alignment={alignment} is not a power of two")
  tensors = []
  for _ in range(tensor_count):
    tensor = text("tensor name")
    n_dims = u32(f"dimension count of {tensor}")
    if n_dims > _GGUF_MAX_DIMS:
      raise ValueError(f"{name}: corrupt GGUF file: tensor {tensor} claims {n_dims} dimensions")
    dims = [u64(f"dimensions of {tensor}") for _ in range(n_dims)]
    raw_type, offset = u32(f"type of {tensor}"), u64(f"offset of {tensor}")
    try:
      block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
      raise ValueError(f"{name}: corrupt GGUF file: tensor {tensor} has unknown type {raw_type}") from None
    elements = math.prod(dims)
    if elements % block:
      raise ValueError(f"{name}: corrupt GGUF file: tensor {tensor} of shape {dims} is not whole blocks of {block}")
    tensors.append((tensor, offset, elements // block * type_size))
  data_start = -(-pos // alignment) * alignment
  for tensor, offset, n_bytes in tensors:
    if data_start + offset + n_bytes > size:
      raise ValueError(
          f"{name}: truncated or corrupt GGUF file: tensor {tensor}'s {n_bytes} bytes at offset {offset} run past "
          f"the end of the file"
      )


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
  """Opens a GGUF file after checking its header against the file's size.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not GGUF, or is truncated or corrupt (the message names the file).
  """
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise FileNotFoundError(f"GGUF file not found: {name}")
  size = os.path.getsize(name)
  if size == 0:
    raise ValueError(f"{name}: empty file; expected a GGUF file")
  with open(name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    _check_gguf_layout(buf, size, name)
  try:
    return gguf.GGUFReader(name)
  except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, struct.error) as e:
    # The layout check above should leave nothing for these; kept so that no parser error escapes bare.
    raise ValueError(f"{name}: corrupt GGUF file: {type(e).__name__}: {e}") from None


_GGUF_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
}


def gguf_value(reader: gguf.GGUFReader, key: str, kind: str, default=None):
  """A GGUF metadata value checked to be of `kind` (a key of _GGUF_KINDS), or `default` if absent.

  Raises:
    ValueError: the value cannot be decoded or has another type (the message names the file).
  """
  field = reader.fields.get(key)
  if field is None:
    return default
  try:
    value = field.contents()
  except (UnicodeDecodeError, ValueError, IndexError) as e:
    raise ValueError(f"{reader.data.filename}: GGUF metadata {key!r} cannot be read: {e}") from None
  if not _GGUF_KINDS[kind](value):
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:80] + "..."
    raise ValueError(f"{reader.data.filename}: GGUF metadata {key!r} must be {kind}, got {shown}")
  return value
