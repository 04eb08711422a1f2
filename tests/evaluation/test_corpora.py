"""Tests for evaluation.corpora: MediaWiki cleaning, splits, WikiText-2 loaders."""

import bz2
import shutil
import socket
import time
from xml.sax.saxutils import escape

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation import corpora

_ALPHA_WIKITEXT = """{{Infobox letter|name=Alpha|size=[[Big]]}}
'''Alpha''' is a [[Greek alphabet|letter]] of the [[alphabet]].<ref name="a">{{cite book|title=SECRETBOOK}}</ref> It is {{convert|5|km}} long.
{| class="wikitable"
|-
| TABLECELL || other
|}
== History ==
Alpha came first.<ref>FOOTNOTE text</ref> See [http://example.org the site] [http://example.org/bare].
[[File:Alpha.png|thumb|CAPTION here]]
* A list item with &amp; entity
<!-- HIDDEN comment -->
== Empty section ==
{| class="wikitable"
| only a table
|}
== References ==
{{reflist}}
REFERENCE junk.
[[Category:Letters]]
[[fr:Alpha]]
"""

_ALPHA_CLEAN = "\n\n".join([
    " = Alpha = ",
    " Alpha is a letter of the alphabet. It is 5 km long. ",
    " = = History = = ",
    " Alpha came first. See the site. ",
    " A list item with & entity ",
])


def _page(title: str, text: str, *, ns: int = 0, redirect: str | None = None) -> str:
  redirect_elem = f'<redirect title="{escape(redirect)}" />' if redirect else ""
  return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{redirect_elem}"
          f'<revision><id>2</id><text xml:space="preserve">{escape(text)}</text></revision></page>')


def _write_dump(path, pages: list[str]) -> None:
  xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
         "<siteinfo><sitename>Test</sitename></siteinfo>" + "".join(pages) + "</mediawiki>")
  with bz2.open(path, "wt", encoding="utf-8") as f:
    f.write(xml)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FLEXQ_CACHE", str(tmp_path / "cache"))


def test_clean_wikitext_strips_markup_keeps_title():
  assert corpora.clean_wikitext("Alpha", _ALPHA_WIKITEXT) == _ALPHA_CLEAN


def test_sections_left_empty_are_dropped_with_their_headings():
  wikitext = ("Intro.\n== A ==\n=== A1 ===\n{|\n| x\n|}\n== B ==\nBody.\n=== B1 ===\n"
              "[[File:x.png|thumb|pic]]\n== See also ==\n* [[Other]]\n")
  assert corpora.clean_wikitext("T", wikitext) == " = T = \n\n Intro. \n\n = = B = = \n\n Body. "


def test_dump_skips_redirects_and_other_namespaces(tmp_path):
  dump = tmp_path / "dump.xml.bz2"
  _write_dump(dump, [
      _page("Alpha", _ALPHA_WIKITEXT),
      _page("Old Alpha", "#REDIRECT [[Alpha]]", redirect="Alpha"),
      _page("Legacy", "#redirect [[Alpha]]"),  # old dumps mark redirects only in the text
      _page("Talk:Alpha", "TALKPAGE discussion text", ns=1),
      _page("Template:Box", "TEMPLATEPAGE body", ns=10),
  ])
  articles = corpora.clean_dump(dump)
  assert [a.title for a in articles] == ["Alpha"]
  assert articles[0].text == _ALPHA_CLEAN


def _numbered_dump(path, n: int) -> None:
  _write_dump(path, [
      _page(f"Article {i}", f"Body of article number {i}.\n== Part ==\nMore text {i}.")
      for i in range(n)
  ])


def test_split_by_whole_articles_disjoint_and_deterministic(tmp_path):
  dump = tmp_path / "dump.xml.bz2"
  _numbered_dump(dump, 12)
  corpus = corpora.corpus_from_dump(dump, name="fixture")
  again = corpora.corpus_from_dump(dump, name="fixture", use_cache=False)
  assert corpus == again

  def titles(text):
    return {line.strip(" =") for line in text.split("\n\n") if line.startswith(" = ") and
            not line.startswith(" = = ")}

  calib, held_out = titles(corpus.calib_text), titles(corpus.eval_text)
  assert held_out == {"Article 4", "Article 9"}
  assert calib == {f"Article {i}" for i in range(12)} - held_out
  assert "article number 4." in corpus.eval_text
  assert "article number 4." not in corpus.calib_text
  assert corpus.calib_text.startswith(" = Article 0 = \n\n")


def test_dump_cache_written_and_corrupt_cache_rebuilt(tmp_path):
  dump = tmp_path / "dump.xml.bz2"
  _numbered_dump(dump, 6)
  first = corpora.load_dump(dump)
  (cache_file,) = (tmp_path / "cache" / "corpora").glob("dump.xml.bz2-*.json")
  assert f"-v{corpora.CLEANER_VERSION}.json" in cache_file.name
  cache_file.write_text("{not json")
  assert corpora.load_dump(dump) == first
  assert cache_file.read_text().startswith("{")  # rewritten


def test_split_text_cuts_at_paragraph_boundary():
  paragraphs = [f"paragraph {i} " + "x" * 50 for i in range(20)]
  text = "\n\n".join(paragraphs)
  calib, held_out = corpora.split_text(text, eval_fraction=0.2)
  assert calib + "\n\n" + held_out == text
  assert not set(calib.split("\n\n")) & set(held_out.split("\n\n"))
  assert 0.1 < len(held_out) / len(text) < 0.25
  with pytest.raises(ValueError, match="too short"):
    corpora.split_text("word")


def test_load_corpus_txt_and_parquet(tmp_path):
  rows = [f" line {i} with some words " for i in range(30)]
  txt = tmp_path / "c.txt"
  txt.write_text("\n\n".join(rows), encoding="utf-8")
  parquet = tmp_path / "c.parquet"
  pq.write_table(pa.table({"text": rows}), parquet)
  from_txt = corpora.load_corpus(str(txt))
  from_parquet = corpora.load_corpus(parquet)
  assert (from_txt.calib_text, from_txt.eval_text) == (from_parquet.calib_text,
                                                       from_parquet.eval_text)
  assert from_txt.eval_text.endswith(rows[-1])
  assert rows[-1] not in from_txt.calib_text
  with pytest.raises(FileNotFoundError, match="unknown corpus"):
    corpora.load_corpus(tmp_path / "missing.txt")


def test_default_corpus_loads_and_caches():
  start = time.perf_counter()
  corpus = corpora.default_corpus()
  uncached = time.perf_counter() - start
  assert corpus.name == "wiki-excerpt"
  total = len(corpus.calib_text) + len(corpus.eval_text)
  assert 2_500_000 < total < 3_300_000
  assert 0.12 < len(corpus.eval_text) / total < 0.3
  assert corpus.calib_text.startswith(" = Anarchism = \n\n Anarchism is a political philosophy")
  assert corpus.eval_text.startswith(" = Alabama = ")
  for marker in ("{{", "}}", "[[", "]]", "<ref", "&amp;", "'''"):
    assert marker not in corpus.calib_text and marker not in corpus.eval_text, marker

  def titles(text):
    return {line for line in text.split("\n\n")
            if line.startswith(" = ") and line.endswith(" = ") and not line.startswith(" = = ")}

  assert not titles(corpus.calib_text) & titles(corpus.eval_text)
  assert len(titles(corpus.calib_text) | titles(corpus.eval_text)) == 106
  start = time.perf_counter()
  assert corpora.default_corpus() == corpus
  assert time.perf_counter() - start < uncached / 3  # came from the cache


def test_missing_gensim_message(monkeypatch):
  monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
    corpora.wiki_excerpt_path()


# --- WikiText-2 --------------------------------------------------------------------------------

# Rows as the Hugging Face dataset holds them: lines keep "\n", blank lines are "". The U+2028
# inside a line must not split it.
_WT_ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor \u2028 .\n", "",
            " = = Career = = \n", "", " He starred in 2000 .\n"]
_WT_RAW = " \n = Robert Boulter = \n \n Robert Boulter is an English actor \u2028 .\n \n" \
          " = = Career = = \n \n He starred in 2000 .\n"


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
  """Empty Hugging Face caches, no local WikiText copy, and a socket that fails loudly."""
  for var in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv("FLEXQ_WIKITEXT2_DIR", raising=False)
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

  def no_network(*args, **kwargs):
    raise AssertionError("network access attempted")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  return tmp_path / "hf"


def test_wikitext2_local_parquet_joins_rows(tmp_path, offline_hf):
  folder = tmp_path / "wt" / "wikitext-2-raw-v1"
  folder.mkdir(parents=True)
  pq.write_table(pa.table({"text": _WT_ROWS}), folder / "test-00000-of-00001.parquet")
  assert corpora.wikitext2("test", data_dir=tmp_path / "wt") == "\n\n".join(_WT_ROWS)


def test_wikitext2_local_raw_file_matches_dataset_rows(tmp_path, offline_hf):
  (tmp_path / "wiki.valid.raw").write_text(_WT_RAW, encoding="utf-8")
  assert corpora.wikitext2("validation", data_dir=tmp_path) == "\n\n".join(_WT_ROWS)
  with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
    corpora.wikitext2("test", data_dir=tmp_path)


def test_wikitext2_hub_cache_snapshot(offline_hf):
  folder = offline_hf / "hub" / "datasets--Salesforce--wikitext" / "snapshots" / "abc" / \
      "wikitext-2-raw-v1"
  folder.mkdir(parents=True)
  pq.write_table(pa.table({"text": _WT_ROWS}), folder / "test-00000-of-00001.parquet")
  assert corpora.wikitext2("test") == "\n\n".join(_WT_ROWS)


def test_wikitext2_datasets_arrow_cache(tmp_path, offline_hf):
  datasets = pytest.importorskip("datasets")
  from datasets.data_files import DataFilesDict
  from datasets.packaged_modules.parquet.parquet import Parquet

  # Build an Arrow cache the way `load_dataset` leaves one, then move it where a download of
  # Salesforce/wikitext would have put it.
  source = tmp_path / "test.parquet"
  pq.write_table(pa.table({"text": _WT_ROWS}), source)
  builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="wikitext",
                    config_name="wikitext-2-raw-v1",
                    data_files=DataFilesDict.from_patterns({"test": [str(source)]}))
  builder.download_and_prepare()
  target = offline_hf / "datasets" / "Salesforce___wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "abc"
  target.parent.mkdir(parents=True)
  shutil.move(builder.cache_dir, target)
  offline_before = datasets.config.HF_HUB_OFFLINE
  assert corpora.wikitext2("test") == "\n\n".join(_WT_ROWS)
  assert datasets.config.HF_HUB_OFFLINE == offline_before  # the flag is restored
  with pytest.raises(FileNotFoundError, match="'train' split could not be loaded offline"):
    corpora.wikitext2("train")


def test_wikitext2_without_local_copy_explains(offline_hf):
  with pytest.raises(FileNotFoundError, match="not available offline.*FLEXQ_WIKITEXT2_DIR"):
    corpora.wikitext2("test")
  with pytest.raises(ValueError, match="split"):
    corpora.wikitext2("dev")


def test_load_corpus_wikitext2_uses_train_and_test(tmp_path, offline_hf):
  (tmp_path / "wiki.train.raw").write_text(" \n = Train = \n", encoding="utf-8")
  (tmp_path / "wiki.test.raw").write_text(_WT_RAW, encoding="utf-8")
  corpus = corpora.load_corpus("wikitext2", data_dir=tmp_path)
  assert corpus.calib_text == "\n\n = Train = \n"
  assert corpus.eval_text == "\n\n".join(_WT_ROWS)


def test_lee_news_is_evaluation_only_text_from_the_gensim_wheel():
  corpus = corpora.load_corpus("lee-news")
  assert corpus.name == "lee-news" and corpus.calib_text == ""
  assert len(corpus.eval_text) > 300_000 and corpus.eval_text.startswith("Hundreds of people have been forced")
  assert corpus.eval_text.count(corpora.BLOCK_SEPARATOR) >= 250  # one block per article
  assert "lee-news" in corpora.HELD_OUT
