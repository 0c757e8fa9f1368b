"""clean_caption=True (pixart.pipelines.captions) cleans captions exactly as diffusers' PixArt pipeline does, on
captions with URLs, HTML, handles, emoji, CJK, numbers, IDs, file names and mojibake; without its optional packages
it is one error line naming them."""
import builtins

import pytest

from pixart.pipelines.captions import clean_caption, clean_captions

pytest.importorskip("bs4")
pytest.importorskip("ftfy")

CAPTIONS = [
    "A cute dog",
    "  Photo of a Cat, 4K!  ",
    "Check https://example.com/path?x=1 and www.site.org/page for more",
    "visit http://foo.bar/baz.html now @johnsmith99 says hi",
    "<b>Bold</b> <i>text</i> with <a href='x'>a link</a> &amp; more &quot;quoted&quot;",
    "<person> walking a dog in the park",
    "一只可爱的猫 sitting on a 桌子 ののの",
    "emoji party 🎉🐶✨ with friends 😀",
    "IP 192.168.0.1 and id 123456789 and #123 and #12345678 tag",
    "file IMG_2034.JPG and photo.png and document.pdf download free",
    "free shipping worldwide shipping click on here page 12",
    "sizes 1920x1080 and 3.5×2 and jc6640 jc6640vc 6640vc231 j2d1a2a3",
    "this-is-my-cute-cat_with_underscores",
    "em—dash – en dash ― bar and 'single' ‘curly’ “double” «guillemets»",
    "Ã©tÃ© broken mojibake cafÃ©",
    "'''quoted''' ... dots *** stars ### hashes | pipes {braces} [brackets]",
    "text with a literal \\n newline and 12:34   ",
    "hello%20world+plus+signs%21",
    "'surrounded by quotes'",
    ".hidden",
    "Ends with a dash -",
    "",
    "100% cotton T-shirt, size: XL ; price : $20.99 / each",
]


def _diffusers():
    from diffusers import PixArtAlphaPipeline
    return object.__new__(PixArtAlphaPipeline)


def test_clean_caption_equals_diffusers_on_tricky_captions():
    pipe = _diffusers()
    want = pipe._text_preprocessing(CAPTIONS, clean_caption=True)
    assert clean_captions(CAPTIONS) == want
    assert want[2] != CAPTIONS[2].lower().strip() and want[6] != CAPTIONS[6].lower()  # the cleaning did something
    for caption in CAPTIONS:
        assert clean_caption(caption) == pipe._clean_caption(pipe._clean_caption(caption)), caption


def test_without_the_packages_one_line_names_them(monkeypatch):
    real_import = builtins.__import__

    def no_ftfy(name, *args, **kwargs):
        if name in ("ftfy", "bs4"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ftfy)
    with pytest.raises(ValueError, match=r"^clean_caption=True needs the optional package\(s\) beautifulsoup4 and "
                                         r"ftfy \(pip install beautifulsoup4 ftfy\), or pass clean_caption=False$"):
        clean_caption("a cat")


def test_the_pipeline_encodes_cleaned_prompts_and_negative_prompts(bundle, monkeypatch):
    from pixart import demo_bundle as demo
    from pixart.pipelines.text_to_image import PixArtPipeline
    comp = bundle.components
    pipe = PixArtPipeline.from_pretrained(checkpoint=bundle.checkpoint, model=demo.PRESET, vae_root=comp / "vae",
                                          text_encoder_root=comp / "text_encoder", tokenizer_root=comp / "tokenizer",
                                          log=lambda *_: None)
    real, encoded = pipe.encode_prompt, []

    class Encoded(Exception):
        pass

    def encode_prompt(prompts, max_length=None):
        encoded.append(list(prompts))
        if len(encoded) == 2:
            raise Encoded
        return real(prompts, max_length)

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    prompt, negative = "<b>A Red</b> Square https://x.com/a.png", "blurry!!! #123 @someone"
    with pytest.raises(Encoded):
        pipe([prompt], negative_prompt=negative, height=64, width=64, num_inference_steps=1,
             use_resolution_binning=False, clean_caption=True, progress=False)
    assert encoded == [[clean_caption(prompt)], [clean_caption(negative)]]
    assert encoded[0][0].startswith("a red square") and encoded[1] == ["blurry!!!"]
