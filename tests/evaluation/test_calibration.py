"""Tests for evaluation.calibration: crops of the token stream and cached tokenization."""

import numpy as np
import pytest
import tokenizers

from evaluation import calibration


class ByteTokenizer:
  """Stand-in tokenizer: one token per UTF-8 byte; counts its encode calls."""

  fingerprint = "byte-tokenizer-v1"

  def __init__(self):
    self.calls = 0

  def encode(self, text: str) -> list[int]:
    self.calls += 1
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]


class AnonymousTokenizer(ByteTokenizer):
  fingerprint = None


def test_calibration_batch_reproducible_and_seeded():
  ids = np.arange(5000)
  a = calibration.calibration_batch(ids, batch_size=4, seq_len=64, seed=3)
  b = calibration.calibration_batch(ids, batch_size=4, seq_len=64, seed=3)
  c = calibration.calibration_batch(ids, batch_size=4, seq_len=64, seed=4)
  assert a.shape == (4, 64) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_calibration_crops_are_substrings_of_the_stream():
  ids = np.random.default_rng(0).permutation(20000)  # unique values: a crop's start is findable
  batch = calibration.calibration_batch(ids, batch_size=16, seq_len=100, seed=0)
  starts = []
  for row in batch:
    (start,) = np.flatnonzero(ids == row[0])
    np.testing.assert_array_equal(row, ids[start:start + 100])
    starts.append(start)
  assert len(set(starts)) > 1


def test_calibration_batch_exact_fit_and_errors():
  ids = np.arange(10, dtype=np.int64)
  np.testing.assert_array_equal(calibration.calibration_batch(ids, batch_size=2, seq_len=10),
                                np.stack([ids, ids]).astype(np.int32))
  with pytest.raises(ValueError, match="10 tokens, fewer than seq_len=11"):
    calibration.calibration_batch(ids, batch_size=1, seq_len=11)
  with pytest.raises(ValueError, match="batch_size=0"):
    calibration.calibration_batch(ids, batch_size=0, seq_len=4)
  with pytest.raises(ValueError, match="1-D integer"):
    calibration.calibration_batch(ids.reshape(2, 5), batch_size=1, seq_len=2)
  with pytest.raises(ValueError, match="1-D integer"):
    calibration.calibration_batch(ids.astype(np.float32), batch_size=1, seq_len=2)


def test_tokenize_corpus_caches_by_text_and_tokenizer(tmp_path):
  tok = ByteTokenizer()
  text = "Héllo world.\n\n = Title = \n\n 1995 was a year."
  ids = calibration.tokenize_corpus(tok, text, cache_dir=tmp_path)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
  again = calibration.tokenize_corpus(tok, text, cache_dir=tmp_path)
  np.testing.assert_array_equal(again, ids)
  assert tok.calls == 1  # second call came from the cache

  calibration.tokenize_corpus(tok, text + " more", cache_dir=tmp_path)
  assert tok.calls == 2  # a different text is a different entry
  assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2

  for f in (tmp_path / "tokens").glob("*.npy"):
    f.write_bytes(b"garbage")
  np.testing.assert_array_equal(calibration.tokenize_corpus(tok, text, cache_dir=tmp_path), ids)
  assert tok.calls == 3  # corrupt entry rebuilt


def test_tokenize_corpus_without_fingerprint_is_not_cached(tmp_path):
  tok = AnonymousTokenizer()
  calibration.tokenize_corpus(tok, "abc", cache_dir=tmp_path)
  calibration.tokenize_corpus(tok, "abc", cache_dir=tmp_path)
  assert tok.calls == 2
  assert not (tmp_path / "tokens").exists()


def test_fingerprint_of_rust_tokenizer_tracks_its_content():
  def bpe(vocab):
    return tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))

  a = calibration.tokenizer_fingerprint(bpe({"a": 0, "b": 1}))
  assert a == calibration.tokenizer_fingerprint(bpe({"a": 0, "b": 1}))
  assert a != calibration.tokenizer_fingerprint(bpe({"a": 0, "c": 1}))

  class Wrapper:  # models.tokenizer.Tokenizer exposes its Rust tokenizer as `backend`
    def __init__(self, backend):
      self.backend = backend

  assert calibration.tokenizer_fingerprint(Wrapper(bpe({"a": 0}))) is not None
  assert calibration.tokenizer_fingerprint(object()) is None
