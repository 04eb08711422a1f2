"""Text corpora for calibration and perplexity, all read from local files.

Sources:
  * ``"wiki-excerpt"`` (the default): the English Wikipedia excerpt that ships inside the
    ``gensim`` wheel (a shortened MediaWiki XML dump: 106 articles, 2.86 MB of clean text, of
    which 0.47 MB in 21 articles is evaluation text).
    The dump is cleaned with mwparserfromhell into WikiText-like text and cached on disk.
  * ``"wikitext2"``: WikiText-2 (raw), from a local copy or the local Hugging Face cache.
    Nothing is ever downloaded at run time.
  * a ``.txt`` or ``.parquet`` file.

Clean text layout (chosen to look like WikiText-2 raw as the perplexity protocol sees it):
every block (article title, section heading, paragraph, list item) is one line, and the lines
are joined with ``"\\n\\n"``, which is exactly how the protocol builds its text from WikiText's
rows. Titles and headings keep WikiText's markers: ``" = Title = "``, ``" = = Section = = "``.

Calibration and evaluation text never overlap. For the wiki excerpt the split is by whole
articles in dump order: every ``EVAL_EVERY``-th article (indices 4, 9, 14, ...) goes to
evaluation, the rest to calibration, so both halves cover the whole (alphabetical) dump instead
of the evaluation text being one topic cluster. A single ``.txt`` / ``.parquet`` file has no
article structure, so it is cut once at a paragraph boundary: the last ``EVAL_FRACTION`` of the
text is evaluation; a contiguous tail keeps long-range context intact for 2048-token windows.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import importlib.util
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mwparserfromhell
from mwparserfromhell import nodes as mwnodes

# Bump whenever the cleaner's output changes: it is part of the on-disk cache key.
CLEANER_VERSION = 1
# Every EVAL_EVERY-th article of the wiki excerpt (0-based index % EVAL_EVERY == EVAL_EVERY - 1)
# is evaluation text.
EVAL_EVERY = 5
# Fraction of a single text file (by characters, rounded to a paragraph boundary) held out for
# evaluation.
EVAL_FRACTION = 0.2
# Separator between lines / blocks / articles: WikiText-2's protocol joins its rows with it.
BLOCK_SEPARATOR = "\n\n"

_GENSIM_EXCERPT = ("test/test_data/"
                   "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
# The Lee background corpus in the same wheel: about 300 Australian news articles (ABC), one a line.
_GENSIM_NEWS = "test/test_data/lee_background.cor"
# Corpora with no calibration part: held-out text calibration never sees.
HELD_OUT = ("lee-news",)
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
WIKITEXT2_SPLITS = ("train", "validation", "test")
# File stem of each split in the original wikitext-2-raw zip (wiki.train.raw, wiki.valid.raw, ...).
_WIKITEXT2_RAW_STEMS = {"train": "train", "validation": "valid", "test": "test"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Corpus:
  """A named text source split into disjoint calibration and evaluation text."""

  name: str  # e.g. "wiki-excerpt", "wikitext2", or the file path.
  calib_text: str  # Text that calibration crops are drawn from.
  eval_text: str  # Held-out text for perplexity; no article or stretch of the source is in both.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Article:
  """One cleaned article of a MediaWiki dump."""

  title: str
  text: str  # Blocks joined with BLOCK_SEPARATOR, starting with the " = Title = " line.


# ---------------------------------------------------------------------------------------------
# Cache directory
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
  """Returns the on-disk cache directory for cleaned text and token arrays.

  ``$FLEXQ_CACHE`` if set, else ``$XDG_CACHE_HOME/flexq_jax``, else ``~/.cache/flexq_jax``.
  The directory is not created here.
  """
  if env := os.environ.get("FLEXQ_CACHE"):
    return Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
  return base / "flexq_jax"


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename.

  Two processes filling the same cache entry, or a crash mid-write, then leave either a
  complete file or none, never a truncated one.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache is fine to share read-only
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


# ---------------------------------------------------------------------------------------------
# MediaWiki cleaning
# ---------------------------------------------------------------------------------------------

# Tags whose content is not running prose: references, tables, galleries, formulas, code.
_DROPPED_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
    "score", "syntaxhighlight", "source", "hiero", "graph", "mapframe", "maplink",
    "templatedata", "includeonly", "noinclude", "inputbox", "categorytree", "indicator",
})
# Wiki-markup tags that only carry list / rule markers: "*", "#", ":", ";", "----".
_MARKER_TAGS = frozenset({"li", "dt", "dd", "hr"})
_LINE_BREAK_TAGS = frozenset({"br"})
# Links into these namespaces render as media or page metadata, not as words in the sentence.
_DROPPED_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
# Interlanguage links ([[fr:Anarchie]]) sit at the end of an article and render in the sidebar.
_INTERLANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z]{2,8})*:")
# Trailing sections made of citations and link lists rather than prose.
_DROPPED_SECTIONS = frozenset({
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
    "general references", "works cited", "related articles",
})
_RANGE_WORDS = frozenset({"to", "and", "or", "-", "–", "by", "x", "×", "+"})


def _convert(args: list[str]) -> str:
  # {{convert|10|km|mi}} shows "10 km (6.2 mi)"; {{convert|1|to|2|m}} "1 to 2 m (...)".
  if len(args) >= 4 and args[1].strip() in _RANGE_WORDS:
    return " ".join(args[:4])
  return " ".join(args[:2])


# Templates that put words into the sentence, and what of them a reader sees. Every other
# template (infoboxes, citations, navboxes, maintenance tags, pronunciation) renders nothing:
# dropping these few would leave holes such as "a length of  ." in ordinary sentences.
_INLINE_TEMPLATES: dict[str, Callable[[list[str]], str]] = {
    "convert": _convert,
    "cvt": _convert,
    "lang": lambda a: a[-1] if len(a) >= 2 else "",
    "transl": lambda a: a[-1] if len(a) >= 2 else "",
    "nihongo": lambda a: a[0] if a else "",
    "nowrap": lambda a: a[0] if a else "",
    "nobr": lambda a: a[0] if a else "",
    "small": lambda a: a[0] if a else "",
    "smaller": lambda a: a[0] if a else "",
    "sc": lambda a: a[0] if a else "",
    "vr": lambda a: a[0] if a else "",
    "val": lambda a: a[0] if a else "",
    "flag": lambda a: a[0] if a else "",
    "angbr": lambda a: f"⟨{a[0]}⟩" if a else "",
    "as of": lambda a: f"As of {' '.join(a[:3])}" if a else "",
    "frac": lambda a: f"{' '.join(a[:-2])} {a[-2]}/{a[-1]}".strip() if len(a) >= 2 else "",
    "'s": lambda a: "'s",
    "'": lambda a: "'",
    "nbsp": lambda a: " ",
    "thinsp": lambda a: " ",
    "mdashb": lambda a: "—",
    "snd": lambda a: " – ",
}


def _template_text(node: mwnodes.Template) -> str:
  name = str(node.name).strip().lower().replace("_", " ")
  if name.startswith("lang-"):  # {{lang-fr|texte}} shows "French: texte"; keep the words
    render = _INLINE_TEMPLATES["nowrap"]
  elif (render := _INLINE_TEMPLATES.get(name)) is None:
    return ""
  args = [_render(p.value).strip() for p in node.params if not p.showkey]
  return render(args)


_MAGIC_WORD_RE = re.compile(r"__[A-Z]+__")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")  # quote runs left over where bold/italic did not parse
_SPACE_RE = re.compile(r"[ \t\u00a0\u200b\r\f\v]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +([,.;:!?)])")
_SPACE_AFTER_OPEN_RE = re.compile(r"\( +")
_EMPTY_PARENS_RE = re.compile(r"\(\s*[,;:]?\s*\)")
_TABLE_DEBRIS_RE = re.compile(r"^(\{\||\|\}|\|-|\||!)")
_HAS_WORD_RE = re.compile(r"\w")


def _heading_line(title: str, level: int) -> str:
  """WikiText's marker: level 1 is the article title, 2 (``== x ==``) is " = = x = = "."""
  marks = " ".join("=" * level)
  return f" {marks} {title} {marks} "


def _render(code: mwparserfromhell.wikicode.Wikicode) -> str:
  """Renders parsed wikitext to plain text: what a reader sees in the article body."""
  out: list[str] = []
  for node in code.nodes:
    if isinstance(node, mwnodes.Text):
      out.append(str(node.value))
    elif isinstance(node, mwnodes.Wikilink):
      title = str(node.title).strip()
      namespace = title.lstrip(":").split(":", 1)[0].strip().lower() if ":" in title else ""
      if not title.startswith(":") and namespace in _DROPPED_LINK_NAMESPACES:
        continue
      if node.text is not None:
        out.append(_render(node.text))
      elif not title.startswith(":") and _INTERLANGUAGE_RE.match(title):
        continue
      else:
        # A bare link shows its target; "[[Foo#Bar]]" shows "Foo#Bar" on the page too.
        out.append(_render(node.title).lstrip(":"))
    elif isinstance(node, mwnodes.ExternalLink):
      # "[http://x Site]" shows "Site"; a bare "[http://x]" shows a footnote number: drop it.
      if node.title is not None:
        out.append(_render(node.title))
    elif isinstance(node, mwnodes.Tag):
      tag = str(node.tag).strip().lower()
      if tag in _DROPPED_TAGS or tag in _MARKER_TAGS:
        continue
      if tag in _LINE_BREAK_TAGS:
        out.append(" ")
      elif node.contents is not None:
        out.append(_render(node.contents))
    elif isinstance(node, mwnodes.Heading):
      # Newlines keep the heading on a line of its own; the marker is recognised in _blocks.
      out.append(f"\n\x00{node.level}\x00{_render(node.title)}\n")
    elif isinstance(node, mwnodes.HTMLEntity):
      out.append(node.normalize())
    elif isinstance(node, mwnodes.Template):
      out.append(_template_text(node))
    # Comments and template arguments render nothing.
  return "".join(out)


def _clean_line(line: str) -> str:
  line = _MAGIC_WORD_RE.sub("", line)
  line = _BOLD_ITALIC_RE.sub("", line)
  line = _SPACE_RE.sub(" ", line)
  # Dropped templates / refs leave "( )" and " ," behind, e.g. "born (  ; died )".
  line = _EMPTY_PARENS_RE.sub("", line)
  line = _SPACE_AFTER_OPEN_RE.sub("(", line)
  line = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", line)
  line = _SPACE_RE.sub(" ", line)
  return line.strip()


def _blocks(rendered: str) -> list[str]:
  """Splits rendered article text into clean blocks, dropping reference sections."""
  blocks: list[tuple[int, str]] = []  # (heading level or 0 for prose, text)
  skip_below: int | None = None  # inside a dropped section of this heading level
  for raw in rendered.split("\n"):
    if raw.startswith("\x00"):
      _, level_str, title = raw.split("\x00", 2)
      level, title = int(level_str), _clean_line(title)
      if skip_below is not None and level > skip_below:
        continue
      skip_below = level if title.lower() in _DROPPED_SECTIONS else None
      if skip_below is None and title:
        blocks.append((level, title))
      continue
    if skip_below is not None:
      continue
    line = _clean_line(raw)
    if not line or _TABLE_DEBRIS_RE.match(line) or not _HAS_WORD_RE.search(line):
      continue
    blocks.append((0, line))
  # Drop headings whose section turned out empty (e.g. it held only a table or a gallery).
  # Walking backwards, a heading is kept iff the next kept block is prose or a subsection.
  kept: list[str] = []
  next_level: int | None = None  # level of the next kept block; 0 for prose, None at the end
  for level, text in reversed(blocks):
    if level and (next_level is None or 0 < next_level <= level):
      continue
    kept.append(_heading_line(text, level) if level else f" {text} ")
    next_level = level
  return kept[::-1]


def clean_wikitext(title: str, wikitext: str) -> str:
  """Cleans one article's MediaWiki markup into WikiText-like plain text.

  Templates, tables, references, files, categories, interlanguage links, formulas, comments
  and the trailing citation / link-list sections are dropped; links keep their visible text;
  whitespace is normalized. Section headings become WikiText markers (``" = = History = = "``).

  Args:
    title: The article title, kept as the first line, ``" = Title = "``.
    wikitext: The article's raw MediaWiki source.

  Returns:
    The article's blocks joined with ``BLOCK_SEPARATOR``; only the title line if nothing of
    the body survives.
  """
  # skip_style_tags: a stray '' must not swallow the rest of the paragraph as "italic".
  code = mwparserfromhell.parse(wikitext, skip_style_tags=True)
  blocks = [_heading_line(_clean_line(title), 1)] + _blocks(_render(code))
  return BLOCK_SEPARATOR.join(blocks)


def _local(tag: str) -> str:
  """'{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page': dumps differ in namespace."""
  return tag.rsplit("}", 1)[-1]


def iter_dump_pages(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
  """Yields ``(title, wikitext)`` for every article page of a MediaWiki XML dump.

  Redirects and pages outside the main namespace (talk, user, template, ...) are skipped. The
  dump may be bz2-compressed (by extension) or plain XML, in any export schema version.

  Args:
    path: The dump file.

  Yields:
    Title and raw wikitext of each article, in dump order.
  """
  opener = bz2.open if str(path).endswith(".bz2") else open
  with opener(path, "rb") as f:
    for _, elem in ET.iterparse(f, events=("end",)):
      if _local(elem.tag) != "page":
        continue
      fields = {_local(child.tag): child for child in elem}
      ns = fields.get("ns")
      is_article = ns is None or (ns.text or "").strip() == "0"
      text = None
      if "revision" in fields:
        text = next((c.text for c in fields["revision"] if _local(c.tag) == "text"), None)
      title = (fields["title"].text or "").strip() if "title" in fields else ""
      # A redirect page is a one-line "#REDIRECT [[Target]]"; newer dumps also mark it with a
      # <redirect/> element, older ones only in the text.
      is_redirect = "redirect" in fields or (text or "").lstrip().upper().startswith("#REDIRECT")
      if is_article and not is_redirect and title and text:
        yield title, text
      elem.clear()  # iterparse keeps the whole tree otherwise; the real dumps are GBs


def clean_dump(path: str | os.PathLike[str]) -> list[Article]:
  """Parses and cleans every article of a MediaWiki dump (no caching; see ``load_dump``).

  Args:
    path: The dump file (``.xml`` or ``.xml.bz2``).

  Returns:
    The cleaned articles in dump order; articles whose body cleans to nothing are dropped.
  """
  articles = []
  for title, wikitext in iter_dump_pages(path):
    text = clean_wikitext(title, wikitext)
    if BLOCK_SEPARATOR in text:  # more than the title line survived
      articles.append(Article(title=title, text=text))
  return articles


def load_dump(path: str | os.PathLike[str], *, use_cache: bool = True) -> list[Article]:
  """Cleaned articles of a MediaWiki dump, cached on disk.

  The cache file is keyed by the dump's name, size and modification time and by
  ``CLEANER_VERSION``, so editing the cleaner or the dump invalidates it. An unreadable cache
  file is ignored and rewritten.

  Args:
    path: The dump file.
    use_cache: Read and write the cache under ``cache_dir()``.

  Returns:
    The cleaned articles in dump order.
  """
  path = Path(path)
  stat = path.stat()
  key = f"{path.name}-{stat.st_size}-{stat.st_mtime_ns}-v{CLEANER_VERSION}.json"
  cache_file = cache_dir() / "corpora" / key
  if use_cache and cache_file.is_file():
    try:
      payload = json.loads(cache_file.read_text(encoding="utf-8"))
      return [Article(title=t, text=x) for t, x in payload["articles"]]
    except (OSError, ValueError, KeyError, TypeError):
      pass  # corrupt or foreign file: fall through and rebuild it
  articles = clean_dump(path)
  if use_cache:
    payload = {"source": str(path), "cleaner_version": CLEANER_VERSION,
               "articles": [[a.title, a.text] for a in articles]}
    atomic_write_bytes(cache_file, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
  return articles


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def split_articles(articles: Sequence[Article], *,
                   eval_every: int = EVAL_EVERY) -> tuple[list[Article], list[Article]]:
  """Splits articles into (calibration, evaluation) by position, never sharing an article.

  Args:
    articles: Articles in a fixed order (dump order).
    eval_every: Article ``i`` is evaluation iff ``i % eval_every == eval_every - 1``.

  Returns:
    ``(calib_articles, eval_articles)``, each in the input order.
  """
  if eval_every < 2:
    raise ValueError(f"{eval_every=} must be >= 2 so that both parts are non-empty")
  if len(articles) < eval_every:
    raise ValueError(f"need at least {eval_every} articles to split, got {len(articles)}")
  calib = [a for i, a in enumerate(articles) if i % eval_every != eval_every - 1]
  held_out = [a for i, a in enumerate(articles) if i % eval_every == eval_every - 1]
  return calib, held_out


def split_text(text: str, *, eval_fraction: float = EVAL_FRACTION) -> tuple[str, str]:
  """Cuts one text into (calibration, evaluation) at a paragraph boundary.

  The cut is the first ``BLOCK_SEPARATOR`` at or after ``(1 - eval_fraction) * len(text)`` (else
  the last one before it), falling back to a newline, then a space; never inside a word.

  Args:
    text: The whole text.
    eval_fraction: Share of characters, roughly, that goes to evaluation.

  Returns:
    ``(calib_text, eval_text)``; joined by the separator cut at, they give back ``text``.

  Raises:
    ValueError: no boundary leaves text on both sides.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"{eval_fraction=} must be in (0, 1)")
  start = int(len(text) * (1.0 - eval_fraction))
  for sep in (BLOCK_SEPARATOR, "\n", " "):
    for cut in (text.find(sep, start), text.rfind(sep, 0, start)):
      calib, held_out = text[:max(cut, 0)], text[cut + len(sep):]
      if cut >= 0 and calib.strip() and held_out.strip():
        return calib, held_out
  raise ValueError(f"text of {len(text)} characters is too short to split: it needs a "
                   "paragraph, line or word boundary with text on both sides")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def wiki_excerpt_path(member: str = _GENSIM_EXCERPT) -> Path:
  """Path of the Wikipedia dump excerpt (or another data file) inside the installed gensim wheel.

  gensim is located, never imported: importing it needs scipy and smart_open, which this
  project does not install (``pip install --no-deps gensim`` brings only the data file).

  Raises:
    FileNotFoundError: gensim or its test data is not installed.
  """
  spec = importlib.util.find_spec("gensim")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "The default corpus is the Wikipedia excerpt shipped in the gensim wheel, and gensim is "
        "not installed. Install it with `pip install --no-deps gensim` (only its data file is "
        "used), or pass another corpus (a .txt / .parquet path, or 'wikitext2').")
  path = Path(spec.origin).parent / member
  if not path.is_file():
    raise FileNotFoundError(
        f"gensim is installed but its data file is missing: {path}. Reinstall it with "
        "`pip install --no-deps --force-reinstall gensim`.")
  return path


def default_corpus(*, use_cache: bool = True) -> Corpus:
  """The built-in Wikipedia corpus: cleaned gensim excerpt, split by whole articles.

  Args:
    use_cache: Reuse / store the cleaned text under ``cache_dir()`` (an uncached clean takes
      about 5-7 s on one CPU core; a cached load about 0.1 s).

  Returns:
    ``Corpus(name="wiki-excerpt")`` with disjoint calibration and evaluation articles.
  """
  return corpus_from_dump(wiki_excerpt_path(), name="wiki-excerpt", use_cache=use_cache)


def lee_news() -> Corpus:
  """The held-out news corpus: the Lee background corpus in the gensim wheel (299 ABC news
  articles, 0.36 MB), articles joined with BLOCK_SEPARATOR.

  Evaluation only: ``calib_text`` is empty, so no calibration ever sees it (another source and
  genre than the Wikipedia excerpt the default calibration reads).
  """
  lines = wiki_excerpt_path(_GENSIM_NEWS).read_text(encoding="utf-8").splitlines()
  return Corpus(name="lee-news", calib_text="", eval_text=BLOCK_SEPARATOR.join(l.strip() for l in lines if l.strip()))


def corpus_from_dump(path: str | os.PathLike[str], *, name: str | None = None,
                     use_cache: bool = True) -> Corpus:
  """A Corpus from any MediaWiki XML dump, split as ``split_articles`` does.

  Args:
    path: The dump (``.xml`` or ``.xml.bz2``).
    name: Corpus name; the path by default.
    use_cache: Reuse / store the cleaned articles under ``cache_dir()``.

  Returns:
    The corpus; each part is its articles joined with ``BLOCK_SEPARATOR``.
  """
  calib, held_out = split_articles(load_dump(path, use_cache=use_cache))
  return Corpus(name=name or str(path),
                calib_text=BLOCK_SEPARATOR.join(a.text for a in calib),
                eval_text=BLOCK_SEPARATOR.join(a.text for a in held_out))


def load_text_file(path: str | os.PathLike[str]) -> str:
  """Reads a UTF-8 text file as is (newlines normalized to ``"\\n"``)."""
  return Path(path).read_text(encoding="utf-8")


def _parquet_rows(path: str | os.PathLike[str], column: str) -> list[str]:
  import pyarrow as pa  # a dependency of `datasets`; only parquet users need it
  import pyarrow.parquet as pq

  table = pq.read_table(path, columns=[column])
  kind = table.schema.field(column).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise TypeError(f"column {column!r} of {path} holds {kind}, not strings")
  return [row or "" for row in table.column(column).to_pylist()]


def load_parquet(path: str | os.PathLike[str], column: str = "text") -> str:
  """Rows of one string column of a parquet file joined with ``BLOCK_SEPARATOR``.

  Args:
    path: A ``.parquet`` file.
    column: The string column to read; null rows count as empty.

  Returns:
    ``"\\n\\n".join(rows)``: the WikiText protocol's way of making one text from rows.
  """
  return BLOCK_SEPARATOR.join(_parquet_rows(path, column))


def _read_raw_rows(path: Path) -> list[str]:
  """Rows of a WikiText ``wiki.*.raw`` file, as the Hugging Face dataset holds them.

  The dataset keeps each line with its ``"\\n"`` and turns blank lines into ``""``. Lines are
  split on ``"\\n"`` only (file iteration), not ``str.splitlines``, which would also split on
  characters such as U+2028 that occur inside WikiText lines.
  """
  with path.open(encoding="utf-8") as f:
    return [line if line.strip() else "" for line in f]


def _wikitext2_local_files(data_dir: Path, split: str) -> list[Path]:
  raw_name = _WIKITEXT2_RAW_STEMS[split]
  patterns = [
      f"{WIKITEXT2_CONFIG}/{split}-*.parquet",  # Hugging Face repo layout
      f"{split}-*.parquet",
      f"wikitext-2-raw/wiki.{raw_name}.raw",  # original zip layout
      f"wiki.{raw_name}.raw",
  ]
  for pattern in patterns:
    found = sorted(Path(p) for p in glob.glob(str(data_dir / pattern)))
    if found:
      return found
  return []


def _read_wikitext2_files(files: Sequence[Path]) -> str:
  rows: list[str] = []
  for f in files:
    if f.suffix == ".parquet":
      rows.extend(_parquet_rows(f, "text"))
    else:
      rows.extend(_read_raw_rows(f))
  return BLOCK_SEPARATOR.join(rows)


def _hf_home() -> Path:
  return Path(os.environ.get("HF_HOME") or
              Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")


def _hub_cache_files(split: str) -> list[Path]:
  """WikiText-2 parquet files in the Hugging Face hub cache (snapshot of a past download)."""
  hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
             or _hf_home() / "hub")
  for repo in ("datasets--Salesforce--wikitext", "datasets--wikitext"):
    for snapshot in sorted((hub / repo / "snapshots").glob("*"), reverse=True):
      found = sorted(snapshot.glob(f"{WIKITEXT2_CONFIG}/{split}-*.parquet"))
      if found:
        return found
  return []


def _datasets_cache_root() -> Path:
  return Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets")


def _datasets_cache_has_wikitext2(root: Path) -> bool:
  """Whether `datasets` has a prepared (Arrow) WikiText-2 under ``root``."""
  return any(root.glob(f"*wikitext/{WIKITEXT2_CONFIG}/*/*/dataset_info.json"))


def _load_wikitext2_from_datasets_cache(root: Path, split: str) -> str:
  """Loads WikiText-2 through `datasets` with its network paths switched off."""
  import datasets
  import huggingface_hub.constants

  # Both libraries read HF_HUB_OFFLINE once, at import; flip their flags for this call only
  # rather than changing the environment of the whole process.
  saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
  errors = []
  try:
    # "wikitext" is the old name of "Salesforce/wikitext"; a cache may hold either.
    for repo in ("Salesforce/wikitext", "wikitext"):
      try:
        # cache_dir: `datasets` fixes its default cache at import, maybe under another HF_HOME.
        ds = datasets.load_dataset(repo, WIKITEXT2_CONFIG, split=split, cache_dir=str(root))
      except (FileNotFoundError, ConnectionError, ValueError) as e:
        errors.append(f"{repo}: {type(e).__name__}: {e}")
        continue
      return BLOCK_SEPARATOR.join(row or "" for row in ds["text"])
  finally:
    datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
  raise FileNotFoundError(
      f"the datasets cache holds WikiText-2 but its {split!r} split could not be loaded "
      f"offline: {'; '.join(errors)}")


def wikitext2(split: str = "test", data_dir: str | os.PathLike[str] | None = None) -> str:
  """WikiText-2 (raw) text of one split, built as the perplexity protocol does.

  The split's rows are joined with ``"\\n\\n"`` (the Hugging Face rows keep each line's
  ``"\\n"`` and hold ``""`` for blank lines). Nothing is downloaded. Sources, in order:

  1. ``data_dir`` (or ``$FLEXQ_WIKITEXT2_DIR``): a folder holding the Hugging Face parquet
     files (``wikitext-2-raw-v1/test-00000-of-00001.parquet`` or ``test-*.parquet``) or the
     original raw files (``wikitext-2-raw/wiki.test.raw`` or ``wiki.test.raw``).
  2. The Hugging Face hub cache (parquet files of an earlier download).
  3. The `datasets` cache (an earlier ``load_dataset("wikitext", "wikitext-2-raw-v1")``),
     loaded with offline mode forced on.

  Args:
    split: ``"train"``, ``"validation"`` or ``"test"``.
    data_dir: Folder with a local copy; when given, only it is searched.

  Returns:
    The split's text.

  Raises:
    FileNotFoundError: no local copy of the split was found; the message says how to add one.
  """
  if split not in WIKITEXT2_SPLITS:
    raise ValueError(f"{split=} must be one of {WIKITEXT2_SPLITS}")
  if data_dir is None and os.environ.get("FLEXQ_WIKITEXT2_DIR"):
    data_dir = os.environ["FLEXQ_WIKITEXT2_DIR"]
  if data_dir is not None:
    files = _wikitext2_local_files(Path(data_dir), split)
    if not files:
      raise FileNotFoundError(
          f"no WikiText-2 {split!r} split in {data_dir}: expected "
          f"{WIKITEXT2_CONFIG}/{split}-00000-of-00001.parquet (Hugging Face layout) or "
          f"wikitext-2-raw/wiki.{_WIKITEXT2_RAW_STEMS[split]}.raw (original zip).")
    return _read_wikitext2_files(files)
  if files := _hub_cache_files(split):
    return _read_wikitext2_files(files)
  if _datasets_cache_has_wikitext2(datasets_root := _datasets_cache_root()):
    return _load_wikitext2_from_datasets_cache(datasets_root, split)
  raise FileNotFoundError(
      "WikiText-2 is not available offline (it is never downloaded at run time). Provide a "
      "local copy: on a machine with network run `datasets.load_dataset('wikitext', "
      "'wikitext-2-raw-v1')` (then copy ~/.cache/huggingface), or copy the parquet files "
      f"{WIKITEXT2_CONFIG}/{{train,validation,test}}-00000-of-00001.parquet of the "
      "Salesforce/wikitext dataset (or the raw wiki.{train,valid,test}.raw files) into a "
      "folder and pass data_dir=... or set FLEXQ_WIKITEXT2_DIR. Without it, use the default "
      "corpus 'wiki-excerpt'.")


def load_corpus(name_or_path: str | os.PathLike[str] = "wiki-excerpt", *,
                data_dir: str | os.PathLike[str] | None = None) -> Corpus:
  """Loads a corpus by name or path.

  Args:
    name_or_path: ``"wiki-excerpt"`` (default Wikipedia excerpt), ``"wikitext2"`` (calibration
      = train split, evaluation = test split), ``"lee-news"`` (news articles, evaluation only:
      no calibration text), or a path to a ``.txt``, ``.parquet`` (column
      ``text``) or MediaWiki ``.xml`` / ``.xml.bz2`` file. A single file is split as
      ``split_text`` does (a dump as ``split_articles`` does).
    data_dir: Local WikiText-2 folder, for ``"wikitext2"`` only.

  Returns:
    The corpus.
  """
  name = str(name_or_path)
  if name == "wiki-excerpt":
    return default_corpus()
  if name == "lee-news":
    return lee_news()
  if name == "wikitext2":
    return Corpus(name=name, calib_text=wikitext2("train", data_dir),
                  eval_text=wikitext2("test", data_dir))
  path = Path(name).expanduser()
  if not path.is_file():
    raise FileNotFoundError(
        f"unknown corpus {name!r}: not 'wiki-excerpt', 'wikitext2', 'lee-news', nor an existing file")
  if path.name.endswith((".xml", ".xml.bz2")):
    return corpus_from_dump(path, name=name)
  if path.suffix == ".parquet":
    text = load_parquet(path)
  elif path.suffix in (".txt", ".raw", ".text"):
    text = load_text_file(path)
  else:
    raise ValueError(
        f"unsupported corpus file type {path.suffix!r}: use .txt, .parquet or .xml(.bz2)")
  calib, held_out = split_text(text)
  return Corpus(name=name, calib_text=calib, eval_text=held_out)

