"""Caption cleaning, `clean_caption=True`, as diffusers' PixArt pipelines clean a prompt before T5 encodes it.

The cleaning (from DeepFloyd IF, which PixArt's training captions went through) lower-cases the text, drops URLs,
HTML markup, @handles, CJK characters, IDs, file names, shop boilerplate ("free shipping") and stray punctuation,
normalises dashes and quotes, repairs mojibake and HTML entities, and is applied twice. It needs two optional
packages, beautifulsoup4 (HTML to text) and ftfy (broken Unicode); without them `clean_caption=True` is one error
line naming them.
"""
from __future__ import annotations

import html
import re
import urllib.parse

PACKAGES = {"bs4": "beautifulsoup4", "ftfy": "ftfy"}

_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_MEDIA = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

# Each table is a list of (pattern, replacement) applied in order; the phases are separated by the HTML parse, the
# dash/underscore rule and the Unicode repair, exactly where diffusers applies them.
_BEFORE_HTML = [
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _TLDS + r"[\w/-]*\b\/?(?!@)))", ""),  # URLs
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
]
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),                                      # @handles
    (r"[\u31c0-\u9fff]+", ""),                                # CJK strokes .. unified ideographs (one block)
    (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
     r"\uFE58\uFE63\uFF0D]+", "-"),                           # every kind of dash
    (r"[`´«»“”¨]", '"'),                                      # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),             # IP addresses
    (r"\d:\d\d\s+$", ""),                                     # article ids
    (r"\\n", " "),                                            # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _MEDIA, ""),                                # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),      # runs of bad punctuation
    (r"\s+\.\s+", " "),
]
_SEPARATORS = r"(?:\-|\_)"  # this-is-my-cute-cat: more than 3 separators become spaces
_AFTER_UNICODE = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),                       # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),                       # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),                             # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _MEDIA + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),     # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),                     # sizes like 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),                      # surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]
_COMPILED = {name: [(re.compile(p), r) for p, r in table] for name, table in
             (("before", _BEFORE_HTML), ("after", _AFTER_HTML), ("unicode", _AFTER_UNICODE))}


def _modules():
    """(BeautifulSoup, ftfy), or a one-line ValueError naming the packages that are missing."""
    missing = []
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        missing.append(PACKAGES["bs4"])
    try:
        import ftfy
    except ImportError:
        missing.append(PACKAGES["ftfy"])
    if missing:
        raise ValueError(f"clean_caption=True needs the optional package(s) {' and '.join(missing)} "
                         f"(pip install {' '.join(missing)}), or pass clean_caption=False")
    return BeautifulSoup, ftfy


def check_available() -> None:
    """Raise the one-line error now if the cleaning's packages are missing."""
    _modules()


def _substitute(text: str, phase: str) -> str:
    for pattern, replacement in _COMPILED[phase]:
        text = pattern.sub(replacement, text)
    return text


def _clean_once(caption: str, soup, ftfy) -> str:
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _substitute(text, "before")
    text = soup(text, features="html.parser").text
    text = _substitute(text, "after")
    if len(re.findall(_SEPARATORS, text)) > 3:
        text = re.sub(_SEPARATORS, " ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _substitute(text, "unicode").strip()


def clean_caption(caption: str) -> str:
    """One caption as diffusers' `clean_caption=True` gives it to the tokenizer (cleaned twice)."""
    soup, ftfy = _modules()
    return _clean_once(_clean_once(caption, soup, ftfy), soup, ftfy)


def clean_captions(captions: list[str]) -> list[str]:
    return [clean_caption(c) for c in captions]
