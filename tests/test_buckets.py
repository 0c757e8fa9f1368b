"""Aspect-ratio tables and resizing against diffusers (torch only appears here, as the reference)."""
import numpy as np
import pytest
from PIL import Image

from pixart.data.buckets import (
    ASPECT_RATIOS, RESOLUTIONS, TRAIN_ASPECT_RATIOS, bucket_for_image, closest_bucket, micro_conditions,
    resize_and_center_crop, resize_and_crop_array,
)

torch = pytest.importorskip("torch")
alpha = pytest.importorskip("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha")
sigma = pytest.importorskip("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma")
from diffusers.image_processor import PixArtImageProcessor  # noqa: E402

DIFFUSERS_BINS = {
    256: alpha.ASPECT_RATIO_256_BIN,
    512: alpha.ASPECT_RATIO_512_BIN,
    1024: alpha.ASPECT_RATIO_1024_BIN,
    2048: sigma.ASPECT_RATIO_2048_BIN,
}
EXTRA_TRAIN_KEYS = {"0.26", "0.27", "2.89", "3.11", "3.62", "3.75", "3.88"}


def _as_int_table(table):
    out = {}
    for k, (h, w) in table.items():
        assert float(h).is_integer() and float(w).is_integer()
        out[k] = (int(h), int(w))
    return out


# -- tables ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parity
def test_sampling_tables_equal_diffusers(res):
    ref = _as_int_table(DIFFUSERS_BINS[res])
    assert ASPECT_RATIOS[res] == ref
    assert list(ASPECT_RATIOS[res]) == list(ref)  # same order, so min() breaks ties identically


def test_train_tables():
    # The official 2048 training table is the one diffusers bins with; the smaller ones are it scaled down,
    # and they agree with the sampling bins on every shared ratio.
    assert TRAIN_ASPECT_RATIOS[2048] == _as_int_table(DIFFUSERS_BINS[2048])
    for res in RESOLUTIONS:
        train = TRAIN_ASPECT_RATIOS[res]
        assert len(train) == 40
        assert list(train) == list(TRAIN_ASPECT_RATIOS[2048])
        f = 2048 // res
        assert all(train[k] == (h // f, w // f) for k, (h, w) in TRAIN_ASPECT_RATIOS[2048].items())
        assert all(train[k] == v for k, v in ASPECT_RATIOS[res].items())
        extra = set(train) - set(ASPECT_RATIOS[res])
        assert extra == (set() if res == 2048 else EXTRA_TRAIN_KEYS)


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_bucket_sizes(res):
    unit = res // 16  # 16, 32, 64, 128: the tables' guarantee (always a multiple of VAE 8 x patch 2)
    for table in (ASPECT_RATIOS[res], TRAIN_ASPECT_RATIOS[res]):
        assert list(table) == sorted(table, key=float)
        for key, (h, w) in table.items():
            assert h % unit == 0 and w % unit == 0 and h % 16 == 0 and w % 16 == 0, (key, h, w)
            assert abs(float(key) - h / w) <= 0.005 + 1e-9, (key, h, w)
            # roughly res**2 pixels: within the tables' own spread
            assert 0.85 * res * res <= h * w <= 1.05 * res * res, (key, h, w)
    assert ASPECT_RATIOS[res]["1.0"] == (res, res)


# -- closest_bucket ------------------------------------------------------------------------------------------
def _sweep():
    sizes = list(range(8, 4200, 8)) + [1, 3, 7, 33, 97, 255, 257, 1000, 1023, 1025, 5000, 10000]
    rng = np.random.default_rng(0)
    pairs = [(h, w) for h in sizes[::11] for w in sizes[::11]]
    pairs += [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(1000)]
    # exact table sizes and ratio midpoints (where tie-breaking matters)
    for res in RESOLUTIONS:
        keys = list(ASPECT_RATIOS[res])
        pairs += [ASPECT_RATIOS[res][k] for k in keys]
        for a, b in zip(keys, keys[1:]):
            mid = (float(a) + float(b)) / 2
            pairs += [(round(mid * 1000), 1000), (round(mid * 10000), 10000), (round(mid * 400), 400)]
    return pairs


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parity
def test_closest_bucket_matches_diffusers(res):
    for h, w in _sweep():
        ref = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=DIFFUSERS_BINS[res])
        bh, bw, key = closest_bucket(h, w, res)
        assert (bh, bw) == ref, (h, w, res)
        assert ASPECT_RATIOS[res][key] == (bh, bw)


def test_closest_bucket_ties_and_extremes():
    # 0.325 sits exactly between 0.32 and 0.33: whichever float arithmetic picks, it is diffusers' choice
    ref = PixArtImageProcessor.classify_height_width_bin(325, 1000, ratios=DIFFUSERS_BINS[1024])
    assert closest_bucket(325, 1000, 1024)[:2] == ref
    assert closest_bucket(1, 100, 1024)[2] == "0.25"
    assert closest_bucket(100, 1, 1024)[2] == "4.0"
    assert closest_bucket(1024, 1024, 1024) == (1024, 1024, "1.0")
    assert closest_bucket(1024.0, 1024.0, 1024.0) == (1024, 1024, "1.0")
    assert closest_bucket(np.int64(768), np.int64(1344), np.int64(1024)) == (768, 1344, "0.57")
    # 3.75 only exists in the training table at 1024
    assert closest_bucket(3750, 1000, 1024, train=True) == (1920, 512, "3.75")
    assert closest_bucket(3750, 1000, 1024)[2] in ("3.0", "4.0")


def test_bucket_for_image_and_micro_conditions():
    key, (h, w) = bucket_for_image(3900, 5000, 1024)
    assert key == "0.78" and (h, w) == (896, 1152)
    assert bucket_for_image(6000, 1600, 1024) == ("3.75", (1920, 512))
    assert bucket_for_image(6000, 1600, 1024, train=False)[0] in ("3.0", "4.0")
    img_hw, ar = micro_conditions(3900, 5000, key)
    assert img_hw.dtype == np.float32 and img_hw.shape == (2,)
    np.testing.assert_array_equal(img_hw, [3900.0, 5000.0])
    assert isinstance(ar, float) and ar == 0.78
    assert micro_conditions(512, 512, 1.0)[1] == 1.0


# -- resizing --------------------------------------------------------------------------------------------------
def _gradient_image(h, w, mode="RGB"):
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


SRC_SIZES = [(300, 200), (200, 300), (256, 256), (1000, 333), (333, 1000), (97, 1301), (600, 800), (17, 19)]
DST_SIZES = [(256, 256), (192, 336), (336, 192), (128, 512), (512, 128), (96, 64), (31, 17)]


@pytest.mark.parametrize("resample", ["bicubic", "lanczos"])
def test_resize_and_center_crop_exact_size(resample):
    # portrait, landscape and square sources into portrait, landscape and square buckets, up and down
    for src in SRC_SIZES:
        img = _gradient_image(*src)
        for dst in DST_SIZES:
            out = resize_and_center_crop(img, *dst, resample=resample)
            assert out.size == (dst[1], dst[0]), (src, dst)  # PIL size is (width, height)
            assert out.mode == "RGB"


def test_resize_and_center_crop_content():
    # same aspect: a pure resize; identical size: a copy; a wide image keeps its centre
    img = _gradient_image(200, 400)
    assert np.array_equal(np.asarray(resize_and_center_crop(img, 200, 400)), np.asarray(img))
    ref = img.resize((200, 100), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(resize_and_center_crop(img, 100, 200)), np.asarray(ref))
    out = np.asarray(resize_and_center_crop(img, 200, 200))  # 400 wide -> crop columns 100..300
    assert np.array_equal(out, np.asarray(img)[:, 100:300])
    gray = resize_and_center_crop(_gradient_image(50, 80, "L"), 32, 32)
    assert gray.size == (32, 32) and gray.mode == "L"


def _diffusers_resize(x, height, width):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return PixArtImageProcessor.resize_and_crop_tensor(t, width, height).numpy()  # note: width first


def _smooth_batch(rng, n, h, w):
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), x * y], 0)
    noise = rng.random((n, 3, h, w)) * 0.3
    return np.clip(0.5 + 0.35 * base[None] + noise - 0.15, 0, 1).astype(np.float32)


# (binned size the model generated at) -> (size the user asked for)
RESIZE_CASES = [
    ((1024, 1024), (1000, 1100)), ((384, 672), (360, 640)), ((672, 384), (640, 360)), ((288, 864), (300, 900)),
    ((512, 512), (600, 400)), ((256, 256), (123, 77)), ((448, 576), (450, 600)), ((64, 48), (64, 64)),
    ((100, 60), (37, 120)), ((240, 256), (240, 255)),
]


@pytest.mark.parametrize("src,dst", RESIZE_CASES)
@pytest.mark.parity
def test_resize_and_crop_array_matches_diffusers(rng, src, dst):
    x = _smooth_batch(rng, 1, *src)
    ref = _diffusers_resize(x, *dst)
    assert ref.shape == (1, 3, *dst)
    out = resize_and_crop_array(x, *dst)
    assert out.shape == ref.shape and out.dtype == np.float32
    diff = np.abs(out - ref)
    assert np.mean(diff <= 1 / 255) >= 0.99
    assert diff.max() < 1e-5  # in practice float32 rounding only (~2e-7)


def test_resize_and_crop_array_dtypes_and_identity(rng):
    x = _smooth_batch(rng, 1, 64, 96)
    assert resize_and_crop_array(x, 64, 96) is x  # already the right size: untouched, as diffusers
    x64 = x.astype(np.float64)
    out64 = resize_and_crop_array(x64, 50, 50)
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out64, _diffusers_resize(x64, 50, 50), atol=1e-10)
    out16 = resize_and_crop_array(x.astype(np.float16), 50, 50)
    assert out16.dtype == np.float16 and out16.shape == (1, 3, 50, 50)
    # values in [-1, 1] (what the pipeline feeds it) work just the same
    xm = x * 2 - 1
    np.testing.assert_allclose(resize_and_crop_array(xm, 80, 40), _diffusers_resize(xm, 80, 40), atol=1e-5)


def test_resize_and_crop_array_never_short(rng):
    # diffusers computes int(176 * (98 / 176)) = 97 and returns one row short; we return the requested size
    x = _smooth_batch(rng, 1, 176, 352)
    assert _diffusers_resize(x, 98, 150).shape[2] != 98
    out = resize_and_crop_array(x, 98, 150)
    assert out.shape == (1, 3, 98, 150)
    rw = int(352 * (98 / 176))  # the other side keeps diffusers' arithmetic
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(98, rw), mode="bilinear",
                                          align_corners=False).numpy()[:, :, :, (rw - 150) // 2:][..., :150]
    np.testing.assert_allclose(out, ref, atol=1e-5)


# -- bad inputs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [0, 768, 300, -1024, 1024.5, float("nan"), "1024", "big", None, True])
def test_bad_resolution(res):
    with pytest.raises(ValueError, match="resolution") as e:
        closest_bucket(512, 512, res)
    assert repr(res) in str(e.value) and "[256, 512, 1024, 2048]" in str(e.value)
    with pytest.raises(ValueError) as e:
        bucket_for_image(512, 512, res)
    assert repr(res) in str(e.value)


@pytest.mark.parametrize("bad", [0, -5, -0.5, float("nan"), float("inf"), "12", None, True])
def test_bad_sizes(bad):
    for args in ((bad, 512, 1024), (512, bad, 1024)):
        with pytest.raises(ValueError) as e:
            closest_bucket(*args)
        assert repr(bad) in str(e.value)
    with pytest.raises(ValueError) as e:
        bucket_for_image(bad, 512, 1024)
    assert repr(bad) in str(e.value)
    with pytest.raises(ValueError) as e:
        micro_conditions(512, bad, "1.0")
    assert repr(bad) in str(e.value)
    img = _gradient_image(16, 16)
    with pytest.raises(ValueError) as e:
        resize_and_center_crop(img, bad, 8)
    assert repr(bad) in str(e.value)
    with pytest.raises(ValueError) as e:
        resize_and_crop_array(np.zeros((1, 3, 8, 8), np.float32), 8, bad)
    assert repr(bad) in str(e.value)


def test_bad_other_inputs():
    with pytest.raises(ValueError, match="12.5"):
        resize_and_center_crop(_gradient_image(16, 16), 12.5, 8)
    with pytest.raises(ValueError, match="'nearest-ish'"):
        resize_and_center_crop(_gradient_image(16, 16), 8, 8, resample="nearest-ish")
    with pytest.raises(ValueError, match="ndarray"):
        resize_and_center_crop(np.zeros((8, 8, 3)), 8, 8)
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        resize_and_crop_array(np.zeros((3, 8, 8), np.float32), 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        resize_and_crop_array(np.zeros((1, 3, 8, 8), np.uint8), 4, 4)
    with pytest.raises(ValueError, match="'wide'"):
        micro_conditions(512, 512, "wide")
    with pytest.raises(ValueError, match="-1.0"):
        micro_conditions(512, 512, -1.0)
