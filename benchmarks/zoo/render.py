"""Offline, seeded generators of text images (Pillow) and audio (NumPy) for the zoo's calibration and
held-out data.  Nothing here downloads anything: fonts are Pillow's bundled default font
(``ImageFont.load_default(size=...)``) and, when matplotlib is installed, its bundled DejaVu fonts.

Every function takes a ``numpy.random.Generator``; the same seed gives the same data.
"""

from __future__ import annotations

import io
import string
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "model",
    "data",
    "page",
    "text",
    "line",
    "table",
    "figure",
    "section",
    "result",
    "method",
    "value",
    "report",
    "layout",
    "detect",
    "sample",
    "number",
    "total",
    "order",
    "invoice",
    "account",
    "amount",
    "date",
    "name",
    "address",
    "city",
    "report",
    "summary",
    "chapter",
    "price",
    "quantity",
    "item",
)
CHARS = string.ascii_letters + string.digits


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """Bundled TrueType fonts: matplotlib's DejaVu family when matplotlib is installed (else none)."""
    try:
        import matplotlib
    except ImportError:
        return ()
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf")
    return tuple(str(folder / n) for n in names if (folder / n).exists())


def font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A random bundled font at ``size`` pixels (Pillow's default font is always among them)."""
    files = font_files()
    k = int(rng.integers(0, len(files) + 1))
    if k == len(files):
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(files[k], size=size)


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(str(rng.choice(WORDS)) for _ in range(n))


def text_line(rng: np.random.Generator, *, max_chars: int = 18) -> str:
    """A line of words, digits and punctuation (ASCII: in every recogniser's dictionary)."""
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < max_chars - 4:
        r = rng.random()
        if r < 0.65:
            w = str(rng.choice(WORDS))
            parts.append(w.capitalize() if rng.random() < 0.3 else w)
        elif r < 0.85:
            parts.append(str(int(rng.integers(0, 10000))))
        else:
            parts.append(str(rng.choice(["-", ":", "%", "$12", "(a)", "No.", "2024"])))
    return " ".join(parts)[:max_chars].strip()


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    v = int(rng.integers(0, 90))
    return (v, v + int(rng.integers(0, 20)), v + int(rng.integers(0, 20)))


def _paper(rng: np.random.Generator) -> tuple[int, int, int]:
    v = int(rng.integers(215, 256))
    return (v, v - int(rng.integers(0, 12)), v - int(rng.integers(0, 20)))


def page(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB document page: a title, paragraphs of text lines, sometimes a table-like grid."""
    img = Image.new("RGB", (width, height), _paper(rng))
    d = ImageDraw.Draw(img)
    margin = int(width * rng.uniform(0.05, 0.12))
    y = int(height * rng.uniform(0.04, 0.1))
    base = max(8, int(height * rng.uniform(0.025, 0.045)))
    title = font(rng, int(base * 1.6))
    d.text((margin, y), words(rng, int(rng.integers(2, 5))).title(), font=title, fill=_ink(rng))
    y += int(base * 2.6)
    while y < height - margin - base:
        if rng.random() < 0.15:  # a table
            rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 4))
            cw = (width - 2 * margin) // cols
            rh = int(base * 1.6)
            f = font(rng, base)
            for r in range(rows):
                for c in range(cols):
                    x0, y0 = margin + c * cw, y + r * rh
                    if y0 + rh > height - margin:
                        break
                    d.rectangle([x0, y0, x0 + cw, y0 + rh], outline=_ink(rng))
                    d.text((x0 + 3, y0 + 2), words(rng, 1), font=f, fill=_ink(rng))
            y += rows * rh + base
            continue
        f = font(rng, base)
        for _ in range(int(rng.integers(2, 6))):
            if y > height - margin - base:
                break
            line = words(rng, int(rng.integers(3, 9)))
            d.text((margin + int(rng.integers(0, base)), y), line, font=f, fill=_ink(rng))
            y += int(base * rng.uniform(1.25, 1.6))
        y += int(base * rng.uniform(0.5, 1.2))
    return img


def photo(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """``img`` as a phone photo or a cheap scan of part of it: a skew of up to ±8° (70% of the
    time), a crop of 35–100% of each side, lowered contrast, a brightness change, blur (60%),
    sensor noise and JPEG compression at quality 15–80."""
    if rng.random() < 0.7:
        img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR, expand=True, fillcolor=_paper(rng))
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.35, 1.0)), int(h * rng.uniform(0.35, 1.0))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.3, 1.0)))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.2)))
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.8))))
    noisy = np.asarray(img).astype(np.float32) + rng.normal(0, rng.uniform(0, 18), (img.height, img.width, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(15, 80)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def line_image(rng: np.random.Generator, text: str, height: int) -> Image.Image:
    """One line of ``text`` on plain paper, tightly cropped around the ink with a small margin."""
    size = int(height * rng.uniform(0.55, 0.75))
    f = font(rng, size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=f)
    pad = int(height * 0.15)
    img = Image.new("RGB", (x1 - x0 + 2 * pad, height), _paper(rng))
    ImageDraw.Draw(img).text((pad - x0, (height - (y1 - y0)) // 2 - y0), text, font=f, fill=_ink(rng))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    return img


def captcha(rng: np.random.Generator, text: str, width: int, height: int) -> Image.Image:
    """A captcha-like image: jittered, rotated glyphs on a noisy coloured background with lines."""
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    img = Image.new("RGB", (width, height), bg)
    step = width / (len(text) + 1)
    for i, ch in enumerate(text):
        f = font(rng, int(height * rng.uniform(0.5, 0.7)))
        glyph = Image.new("RGBA", (height, height), (0, 0, 0, 0))
        col = tuple(int(v) for v in rng.integers(0, 120, 3))
        ImageDraw.Draw(glyph).text((height // 5, height // 8), ch, font=f, fill=(*col, 255))
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        x = int(step * (i + 0.5) + rng.uniform(-step * 0.15, step * 0.15))
        img.paste(glyph, (x - height // 5, int(rng.uniform(-height * 0.1, height * 0.1))), glyph)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def captcha_text(rng: np.random.Generator) -> str:
    return "".join(str(rng.choice(list(CHARS))) for _ in range(int(rng.integers(4, 7))))


# ------------------------------------------------------------------------------------------ audio


def audio_clip(rng: np.random.Generator, seconds: float, sr: int = 16000) -> NDArray[np.float32]:
    """Synthetic audio in [-1, 1]: silence with noise, tones, and speech-like bursts (a harmonic
    series with a moving pitch and a syllable-rate envelope), each segment at a random level."""
    n = int(seconds * sr)
    out = np.zeros(n, np.float64)
    t0 = 0
    while t0 < n:
        dur = int(sr * rng.uniform(0.2, 1.2))
        t = np.arange(min(dur, n - t0)) / sr
        kind = rng.choice(["silence", "noise", "tone", "speech", "speech"])
        if kind == "noise":
            seg = rng.standard_normal(t.size) * rng.uniform(0.005, 0.1)
        elif kind == "tone":
            seg = np.sin(2 * np.pi * rng.uniform(200, 3000) * t) * rng.uniform(0.05, 0.5)
        elif kind == "speech":
            f0 = rng.uniform(90, 250) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            seg = sum(np.sin(k * phase) / k ** rng.uniform(0.8, 1.5) for k in range(1, 12))
            env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t), 0, None) ** 0.5
            seg = seg * env * rng.uniform(0.05, 0.4) + rng.standard_normal(t.size) * 0.003
        else:
            seg = rng.standard_normal(t.size) * 1e-4
        out[t0 : t0 + t.size] = seg
        t0 += t.size
    return np.clip(out, -1, 1).astype(np.float32)


def speech_noisy(rng: np.random.Generator, n: int, snr_db: float) -> NDArray[np.float32]:
    """``n`` samples of speech-like audio (:func:`audio_clip` segments back to back with short
    gaps) plus white or pink-ish noise at ``snr_db`` dB, peak-limited to [-1, 1]."""
    clean = np.zeros(n)
    t0 = 0
    while t0 < n:
        seg = audio_clip(rng, float(rng.uniform(1, 3)))
        clean[t0 : t0 + seg.size] = seg[: n - t0]
        t0 += seg.size + int(rng.integers(0, 4000))
    noise = rng.standard_normal(n)
    if rng.random() < 0.5:  # pink-ish: integrated white noise with its slow drift removed
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(200) / 200, "same")
    noise *= np.sqrt(np.mean(clean**2) / max(np.mean(noise**2), 1e-12) / 10 ** (snr_db / 10))
    x = clean + noise
    return (x / max(1.0, float(np.abs(x).max()))).astype(np.float32)


def notes(
    rng: np.random.Generator, n: int, sr: int, fps: float, frames: int, lowest: int = 21
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """``n`` samples of 2–6 instrument-like notes (MIDI 36–84, 7 harmonics, percussive envelope with
    a short release, random onsets and lengths) and their piano roll ``(frames, 88)`` at ``fps``
    frames per second (column ``k`` is MIDI ``lowest + k``)."""
    x = np.zeros(n)
    roll = np.zeros((frames, 88), bool)
    t = np.arange(n) / sr
    for _ in range(int(rng.integers(2, 7))):
        midi = int(rng.integers(36, 85))
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        on = float(rng.uniform(0, 0.8 * n / sr))
        off = min(on + float(rng.uniform(0.2, 1.2)), n / sr)
        env = np.clip((t - on) / 0.01, 0, 1) * np.exp(-(t - on) * rng.uniform(0.5, 4)) * ((t >= on) & (t < off))
        env += (t >= off) * np.exp(-(t - off) * 30) * np.exp(-(off - on) * 2)
        tone = sum(
            np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.3, 1) / k**1.2
            for k in range(1, 8)
            if k * f0 < sr / 2
        )
        x += tone * env * rng.uniform(0.1, 0.4)
        roll[int(on * fps) : int(off * fps) + 1, midi - lowest] = True
    x += rng.standard_normal(n) * 0.002
    return (x / max(1.0, float(np.abs(x).max()))).astype(np.float32), roll
